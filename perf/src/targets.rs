//! The processes a benchmark runs against, each started here on a loopback port and killed on
//! drop: the perf mock (this binary's `mock` command), nginx as a plain streaming reverse proxy
//! (the floor of any proxy), Aura with its in-memory store, and Aura with a Valkey store (a
//! `valkey-server`, or Debian's wire-compatible `redis-server`, started here too).

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_WITHIN: Duration = Duration::from_secs(20);

/// The targets `run` knows, in the order they are started and listed (the direct baseline first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The mock itself: the baseline of every overhead, always run.
    Direct,
    Nginx,
    /// Aura, budgets on, in-memory store, on its default driver.
    Aura,
    /// The same Aura on epoll (`--io-driver epoll`): what io_uring must beat.
    AuraEpoll,
    /// Aura, budgets on, Valkey store.
    AuraValkey,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Direct,
        Kind::Nginx,
        Kind::Aura,
        Kind::AuraEpoll,
        Kind::AuraValkey,
    ];

    /// The name in `--targets`, in the tables and in the picture.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Nginx => "nginx",
            Kind::Aura => "aura",
            Kind::AuraEpoll => "aura-epoll",
            Kind::AuraValkey => "aura-valkey",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" | "mock" => Some(Kind::Direct),
            "nginx" => Some(Kind::Nginx),
            "aura" => Some(Kind::Aura),
            "aura-epoll" | "epoll" => Some(Kind::AuraEpoll),
            "aura-valkey" | "aura+valkey" | "valkey" => Some(Kind::AuraValkey),
            _ => None,
        }
    }
}

/// The targets of `--targets a,b,...`: known names only, each once, in the order of
/// [`Kind::ALL`], the direct baseline always included (every overhead is measured against it).
pub fn parse_targets(items: &[String]) -> Result<Vec<Kind>, String> {
    let mut kinds = vec![Kind::Direct];
    for item in items.iter().filter(|s| !s.trim().is_empty()) {
        let kind = Kind::parse(item).ok_or_else(|| {
            format!(
                "unknown target `{}` (known: direct, nginx, aura, aura-epoll, aura-valkey)",
                item.trim()
            )
        })?;
        kinds.push(kind);
    }
    kinds.sort();
    kinds.dedup();
    Ok(kinds)
}

/// What `run` measures: the targets asked for, or, when none were, all of them, leaving out
/// aura-valkey (with a note to print) when no Valkey server binary was found. Asking for
/// aura-valkey by name without a server is an error, not a silent skip.
pub fn select_targets(
    asked: Option<&[String]>,
    valkey_found: bool,
) -> Result<(Vec<Kind>, Option<String>), String> {
    let missing = "no valkey-server or redis-server found on PATH (install Debian's redis-server, or pass --valkey-server PATH)";
    match asked {
        Some(items) => {
            let kinds = parse_targets(items)?;
            if kinds.contains(&Kind::AuraValkey) && !valkey_found {
                return Err(format!("aura-valkey was asked for, but {missing}"));
            }
            Ok((kinds, None))
        }
        None if valkey_found => Ok((Kind::ALL.to_vec(), None)),
        None => Ok((
            Kind::ALL
                .into_iter()
                .filter(|k| *k != Kind::AuraValkey)
                .collect(),
            Some(format!("aura-valkey skipped: {missing}")),
        )),
    }
}

/// `name` as a path when it holds a `/`, else the first executable `name` in the directories of
/// `path` (a `PATH` value); then `fallback_dirs` (Debian keeps nginx in /usr/sbin, which a
/// user's PATH may lack).
pub fn find_binary(name: &str, path: &OsStr, fallback_dirs: &[&str]) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        })
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(path)
        .chain(fallback_dirs.iter().map(PathBuf::from))
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
}

/// The Valkey server for aura-valkey: `--valkey-server` when given (it must exist), else
/// `valkey-server`, else `redis-server` (Debian's 7.0 speaks the same protocol).
pub fn find_valkey_server(given: Option<&str>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = ["/usr/bin", "/usr/sbin", "/usr/local/bin"];
    match given {
        Some(name) => find_binary(name, &path, &dirs),
        None => find_binary("valkey-server", &path, &dirs)
            .or_else(|| find_binary("redis-server", &path, &dirs)),
    }
}

/// A started process and the address it serves.
pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
    /// A process the target needs but whose CPU and memory are reported apart from it: the
    /// Valkey server behind aura-valkey (nginx has no store, so it would skew the comparison).
    /// Dropped, so stopped, after the target itself.
    store: Option<Box<Target>>,
}

impl Target {
    /// The processes whose CPU and memory count for this target.
    pub fn pids(&self) -> Vec<u32> {
        crate::procstat::family(self.child.id())
    }

    /// Whether the target's process is still running.
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
    }

    /// The store process behind this target, watched separately.
    pub fn store(&self) -> Option<&Target> {
        self.store.as_deref()
    }
}

impl Drop for Target {
    /// SIGTERM first, so nginx's master stops its workers (a SIGKILLed master leaves its workers
    /// running, orphaned); whatever of the family is left after 5 s is killed. A store behind
    /// the target is stopped the same way right after, when the field drops.
    fn drop(&mut self) {
        let family = self.pids();
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::park_timeout(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in family.iter().skip(1) {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// The perf mock, from this very binary.
pub fn mock(threads: usize) -> std::io::Result<Target> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "mock",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            &threads.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let addr = announced_addr(&mut child, "perf mock listening on ")?;
    Ok(Target {
        name: "mock",
        addr,
        child,
        store: None,
    })
}

/// Aura in front of `upstream`, with `workers` workers, budgets on (in-memory store, a limit
/// no run reaches), logging only warnings (the access log is off, as nginx's is here).
/// With `cpus`, Aura runs under `taskset -c CPUS` (and pins its workers within them).
pub fn aura(
    bin: &Path,
    upstream: SocketAddr,
    workers: usize,
    pin: bool,
    cpus: Option<&str>,
) -> std::io::Result<Target> {
    aura_with(Kind::Aura.name(), bin, upstream, workers, pin, cpus, &[])
}

/// An experiment's extra Aura.
#[derive(Debug, PartialEq)]
pub struct Variant {
    /// Starts with `aura-`: the report checks every `aura…` target against nginx.
    pub name: &'static str,
    /// Another Aura binary (a build before a change), when not the one measured.
    pub binary: Option<PathBuf>,
    pub flags: Vec<OsString>,
}

/// `NAME[@BINARY]=FLAGS`, FLAGS being Aura's own flags separated by spaces: e.g.
/// `aura-plain=--io-uring-setup none`, or `aura-before@/tmp/aura-old=` for a build before a
/// change. The name must start with `aura-` and not be a fixed target's.
pub fn parse_variant(text: &str) -> Result<Variant, String> {
    let (head, flags) = text
        .split_once('=')
        .ok_or_else(|| format!("--variant `{text}`: expected NAME[@BINARY]=FLAGS"))?;
    let (name, binary) = match head.split_once('@') {
        Some((name, binary)) => (name.trim(), Some(PathBuf::from(binary.trim()))),
        None => (head.trim(), None),
    };
    if !name.starts_with("aura-")
        || name.len() > 40
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        || Kind::parse(name).is_some()
    {
        return Err(format!(
            "--variant `{name}`: the name must start with `aura-`, be letters, digits, `-` or `_`, \
             and not be a fixed target's"
        ));
    }
    Ok(Variant {
        // A name lives as long as the run (targets and results are named by `&'static str`).
        name: Box::leak(name.to_owned().into_boxed_str()),
        binary,
        flags: flags.split_whitespace().map(OsString::from).collect(),
    })
}

/// Aura as [`aura`] starts it, with its budgets in a Valkey store: `server` (valkey-server or
/// redis-server) started first on a free loopback port, no persistence, under the same
/// `taskset -c CPUS` as Aura when `cpus` is given (it competes with Aura for those cores).
/// Aura's journal directory and the server's log go to `dir`, the journal fresh each run.
#[allow(clippy::too_many_arguments)]
pub fn aura_valkey(
    bin: &Path,
    server: &Path,
    dir: &Path,
    upstream: SocketAddr,
    workers: usize,
    pin: bool,
    cpus: Option<&str>,
) -> std::io::Result<Target> {
    std::fs::create_dir_all(dir)?;
    let dir = std::fs::canonicalize(dir)?;
    let store = valkey(server, &dir, cpus)?;
    let journal = dir.join("journal");
    match std::fs::remove_dir_all(&journal) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let extra = valkey_flags(store.addr, &journal);
    let mut target = aura_with(
        Kind::AuraValkey.name(),
        bin,
        upstream,
        workers,
        pin,
        cpus,
        &extra,
    )
    .map_err(|e| {
        std::io::Error::other(format!(
            "{e} (it needs an Aura with `--store valkey`; `--targets nginx,aura` leaves \
             aura-valkey out)"
        ))
    })?;
    target.store = Some(Box::new(store));
    Ok(target)
}

/// Aura's flags for a Valkey store at `addr`, its journal in the directory `journal`.
pub fn valkey_flags(addr: SocketAddr, journal: &Path) -> Vec<OsString> {
    vec![
        "--store".into(),
        "valkey".into(),
        "--valkey-url".into(),
        format!("redis://{addr}/").into(),
        "--journal-dir".into(),
        journal.as_os_str().to_owned(),
    ]
}

/// Aura as [`aura`] starts it, named `name`, with `extra` flags: aura-valkey's store flags,
/// aura-epoll's `--io-driver epoll`, an experiment's `--variant`.
pub fn aura_with(
    name: &'static str,
    bin: &Path,
    upstream: SocketAddr,
    workers: usize,
    pin: bool,
    cpus: Option<&str>,
    extra: &[OsString],
) -> std::io::Result<Target> {
    let mut child = command(bin.as_os_str(), cpus)
        .args(["--listen-addr", "127.0.0.1", "--port", "0"])
        .args(["--upstream-url", &format!("http://{upstream}/v1")])
        .args(["--workers", &workers.to_string()])
        .args(["--pin-workers", if pin { "true" } else { "false" }])
        // Budgets stay on (every request reserves and settles) but never run out in a run.
        .args(["--default-limit-dollars", "1000000"])
        .args(extra)
        .env("AURA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let addr = match announced_addr(&mut child, "aura listening on http://") {
        Ok(addr) => addr,
        Err(e) => {
            // Aura exited (an unknown flag, an unreachable store) or never announced itself.
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!("{name} did not start: {e}")));
        }
    };
    let target = Target {
        name,
        addr,
        child,
        store: None,
    };
    wait_accepting(addr)?;
    Ok(target)
}

/// A Valkey (or Redis) server on a free loopback port, in the foreground, with no persistence,
/// its log in `dir/valkey.log`; ready once it answers PING.
pub fn valkey(server: &Path, dir: &Path, cpus: Option<&str>) -> std::io::Result<Target> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    std::fs::create_dir_all(dir)?;
    let log_path = dir.join("valkey.log");
    let log = std::fs::File::create(&log_path)?;
    let child = command(server.as_os_str(), cpus)
        .args(["--save", "", "--appendonly", "no"])
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--daemonize", "no"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    let mut target = Target {
        name: "valkey",
        addr,
        child,
        store: None,
    };
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if ping(addr) {
            return Ok(target);
        }
        if let Some(status) = target.child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "{} exited ({status}) before answering PING; see {}",
                server.display(),
                log_path.display()
            )));
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::other(format!(
                "{} did not answer PING on {addr}; see {}",
                server.display(),
                log_path.display()
            )));
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// Whether a RESP server at `addr` answers `PING` with `+PONG`.
fn ping(addr: SocketAddr) -> bool {
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    conn.write_all(b"PING\r\n").is_ok()
        && conn.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// nginx from `perf/nginx.conf.template`, its prefix (config, pid, temp dirs, error log) in `dir`,
/// under `taskset -c CPUS` when `cpus` is given.
pub fn nginx(
    bin: &str,
    template: &Path,
    dir: &Path,
    upstream: SocketAddr,
    workers: usize,
    cpus: Option<&str>,
) -> std::io::Result<Target> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    std::fs::create_dir_all(dir)?;
    let prefix = std::fs::canonicalize(dir)?;
    let conf = std::fs::read_to_string(template)?
        .replace("__WORKERS__", &workers.to_string())
        .replace("__LISTEN__", &addr.to_string())
        .replace("__UPSTREAM__", &upstream.to_string())
        .replace("__PREFIX__", &prefix.display().to_string());
    std::fs::write(prefix.join("nginx.conf"), conf)?;
    let child = command(bin.as_ref(), cpus)
        .arg("-p")
        .arg(&prefix)
        .args(["-c", "nginx.conf", "-e"])
        .arg(prefix.join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut target = Target {
        name: Kind::Nginx.name(),
        addr,
        child,
        store: None,
    };
    wait_accepting(addr)?;
    // Workers fork after the master binds: wait until they are there to be watched.
    let deadline = Instant::now() + READY_WITHIN;
    while target.pids().len() < workers + 1 {
        if Instant::now() > deadline || target.child.try_wait()?.is_some() {
            return Err(std::io::Error::other("nginx workers did not start"));
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
    Ok(target)
}

/// `bin`, under `taskset -c CPUS` when `cpus` is given (its threads and children stay there).
fn command(bin: &OsStr, cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// Reads the child's stdout until the line that announces its address.
fn announced_addr(child: &mut Child, prefix: &str) -> std::io::Result<SocketAddr> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let wanted = prefix.to_string();
    // A thread, so a child that never prints cannot hang the harness past the deadline.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().parse::<SocketAddr>().ok());
                break;
            }
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(READY_WITHIN) {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) => Err(std::io::Error::other("unparsable address line")),
        Err(_) => Err(std::io::Error::other(format!(
            "no `{prefix}` line from the child"
        ))),
    }
}

/// The driver of each of an Aura's workers (`io_uring` or `epoll`), from its `/metrics`
/// (`aura_worker_driver`): which driver a run measured, as Aura itself reports it.
pub fn aura_drivers(addr: SocketAddr) -> std::io::Result<Vec<String>> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: aura\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    conn.take(4 * 1024 * 1024).read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("aura_worker_driver{"))
        .filter_map(|l| l.split("driver=\"").nth(1)?.split('"').next())
        .map(str::to_string)
        .collect())
}

fn wait_accepting(addr: SocketAddr) -> std::io::Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::park_timeout(Duration::from_millis(10)),
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where the repository's perf/ directory is, for the nginx template.
pub fn perf_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_target_list_is_put_in_order_once_each_with_the_direct_baseline() {
        let kinds = parse_targets(&strings(&[
            "aura-valkey",
            "nginx",
            "aura",
            "epoll",
            "nginx",
        ]))
        .unwrap();
        assert_eq!(kinds, Kind::ALL.to_vec());
        assert_eq!(
            parse_targets(&strings(&["aura"])).unwrap(),
            vec![Kind::Direct, Kind::Aura]
        );
        assert_eq!(
            parse_targets(&strings(&[" Valkey ", "", "aura+valkey", "mock"])).unwrap(),
            vec![Kind::Direct, Kind::AuraValkey]
        );
        assert_eq!(parse_targets(&[]).unwrap(), vec![Kind::Direct]);
        let names: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            ["direct", "nginx", "aura", "aura-epoll", "aura-valkey"]
        );
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
        }
    }

    #[test]
    fn a_variant_is_a_named_aura_with_its_own_flags() {
        let v = parse_variant("aura-plain=--io-uring-setup none").unwrap();
        assert_eq!(v.name, "aura-plain");
        assert_eq!(v.flags, ["--io-uring-setup", "none"]);
        assert_eq!(v.binary, None);
        let v = parse_variant("aura-before@/tmp/aura-old=").unwrap();
        assert_eq!(v.name, "aura-before");
        assert_eq!(v.binary, Some(PathBuf::from("/tmp/aura-old")));
        assert!(v.flags.is_empty());
        for bad in ["plain=--x", "aura-epoll=--x", "aura-a b=--x", "aura-x"] {
            assert!(parse_variant(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_unknown_target_is_refused_by_name() {
        let e = parse_targets(&strings(&["aura", "envoy"])).unwrap_err();
        assert!(e.contains("`envoy`"), "{e}");
    }

    #[test]
    fn aura_valkey_is_in_by_default_only_with_a_server_and_required_when_asked() {
        let (all, note) = select_targets(None, true).unwrap();
        assert_eq!(all, Kind::ALL.to_vec());
        assert!(note.is_none());

        let (without, note) = select_targets(None, false).unwrap();
        assert_eq!(
            without,
            vec![Kind::Direct, Kind::Nginx, Kind::Aura, Kind::AuraEpoll]
        );
        assert!(note.unwrap().starts_with("aura-valkey skipped"));

        let asked = strings(&["nginx", "aura-valkey"]);
        assert!(select_targets(Some(&asked), false).is_err());
        let (kinds, note) = select_targets(Some(&asked), true).unwrap();
        assert_eq!(kinds, vec![Kind::Direct, Kind::Nginx, Kind::AuraValkey]);
        assert!(note.is_none());

        let (kinds, _) = select_targets(Some(&strings(&["nginx", "aura"])), false).unwrap();
        assert_eq!(kinds, vec![Kind::Direct, Kind::Nginx, Kind::Aura]);
    }

    #[test]
    fn a_binary_is_found_on_the_path_or_in_a_fallback_dir_if_executable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("aura-perf-find-{}", std::process::id()));
        let (bin, other) = (dir.join("bin"), dir.join("other"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let exe = bin.join("fake-server");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = other.join("fake-server");
        std::fs::write(&plain, "not executable").unwrap();

        let path = std::env::join_paths([&other, &bin]).unwrap();
        assert_eq!(find_binary("fake-server", &path, &[]), Some(exe.clone()));
        let only_other = std::env::join_paths([&other]).unwrap();
        assert_eq!(find_binary("fake-server", &only_other, &[]), None);
        let fallback = bin.to_str().unwrap();
        assert_eq!(
            find_binary("fake-server", &only_other, &[fallback]),
            Some(exe.clone())
        );
        assert_eq!(
            find_binary(exe.to_str().unwrap(), OsStr::new(""), &[]),
            Some(exe.clone())
        );
        assert_eq!(find_binary(plain.to_str().unwrap(), &path, &[]), None);
        assert_eq!(find_binary("no-such-server", &path, &[]), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn aura_is_pointed_at_the_store_and_the_journal() {
        let flags = valkey_flags(
            "127.0.0.1:6390".parse().unwrap(),
            Path::new("/tmp/x/journal"),
        );
        let flags: Vec<_> = flags.iter().map(|f| f.to_str().unwrap()).collect();
        assert_eq!(
            flags,
            [
                "--store",
                "valkey",
                "--valkey-url",
                "redis://127.0.0.1:6390/",
                "--journal-dir",
                "/tmp/x/journal"
            ]
        );
    }

    /// Starts the real server when this machine has one: it answers PING, and dropping the
    /// target stops it.
    #[test]
    fn a_valkey_server_starts_answers_and_is_stopped_on_drop() {
        let Some(server) = find_valkey_server(None) else {
            eprintln!("no valkey-server or redis-server here: skipped");
            return;
        };
        let dir = std::env::temp_dir().join(format!("aura-perf-valkey-{}", std::process::id()));
        let target = valkey(&server, &dir, None).unwrap();
        assert!(ping(target.addr));
        let (pid, addr) = (target.child.id(), target.addr);
        assert_eq!(target.pids()[0], pid);
        drop(target);
        assert!(
            !ping(addr),
            "the server still answers after its target dropped"
        );
        // Reaped: its pid is gone (or reused by a process that is not the server).
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert!(
            !comm.contains("redis") && !comm.contains("valkey"),
            "{comm}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
