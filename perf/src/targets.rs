//! The processes a benchmark runs against, each started here on a loopback port and killed on
//! drop: the perf mock (this binary's `mock` command), nginx as a plain streaming reverse proxy
//! (the floor of any proxy), and Aura.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_WITHIN: Duration = Duration::from_secs(20);

/// A started process and the address it serves.
pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
}

impl Target {
    /// The processes whose CPU and memory count for this target.
    pub fn pids(&self) -> Vec<u32> {
        crate::procstat::family(self.child.id())
    }
}

impl Drop for Target {
    /// SIGTERM first, so nginx's master stops its workers (a SIGKILLed master leaves its workers
    /// running, orphaned); whatever of the family is left after 5 s is killed.
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
    let mut child = command(bin.as_os_str(), cpus)
        .args(["--listen-addr", "127.0.0.1", "--port", "0"])
        .args(["--upstream-url", &format!("http://{upstream}/v1")])
        .args(["--workers", &workers.to_string()])
        .args(["--pin-workers", if pin { "true" } else { "false" }])
        // Budgets stay on (every request reserves and settles) but never run out in a run.
        .args(["--default-limit-dollars", "1000000"])
        .env("AURA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let addr = announced_addr(&mut child, "aura listening on http://")?;
    wait_accepting(addr)?;
    Ok(Target {
        name: "aura",
        addr,
        child,
    })
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
        name: "nginx",
        addr,
        child,
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
fn command(bin: &std::ffi::OsStr, cpus: Option<&str>) -> Command {
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
