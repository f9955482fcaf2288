//! A real `redis-server` (Debian's 7.0, the wire-compatible stand-in for Valkey; `valkey-server`
//! is used where installed) started per test on a free loopback port, with an append-only file
//! in its own directory so a stop and a restart keep the data, as a real deployment does.
//! `scripts/test` installs redis-server when it is missing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Valkey {
    child: Option<Child>,
    /// One connection for the helpers' reads (tests poll: a connection per poll would use up
    /// the loopback's ports), made again after a restart.
    reader: std::sync::Mutex<Option<redis::Connection>>,
    pub port: u16,
    pub dir: PathBuf,
    /// Serving TLS only, with a certificate for `localhost` signed by this CA (PEM file).
    pub tls_ca: Option<PathBuf>,
}

fn server_binary() -> String {
    for name in ["valkey-server", "redis-server"] {
        let found = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return name.to_string();
        }
    }
    panic!(
        "no valkey-server or redis-server on PATH: run scripts/test, which installs redis-server"
    );
}

impl Valkey {
    /// A fresh server on a free port.
    pub fn start() -> Valkey {
        let port = super::restartable_port();
        let dir = std::env::temp_dir().join(format!("aura-valkey-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut valkey = Valkey {
            child: None,
            reader: std::sync::Mutex::new(None),
            port,
            dir,
            tls_ca: None,
        };
        valkey.restart();
        valkey
    }

    /// A fresh server that speaks only TLS, with a test CA (`tls_ca`) and a `localhost`
    /// certificate it signs.
    pub fn start_tls() -> Valkey {
        let mut valkey = Valkey::stopped();
        let certs = super::test_ca::TestCa::new();
        let ca = valkey.dir.join("ca.pem");
        std::fs::write(&ca, certs.ca_pem).unwrap();
        std::fs::write(valkey.dir.join("server.pem"), certs.leaf_pem).unwrap();
        std::fs::write(valkey.dir.join("server.key"), certs.key_pem).unwrap();
        valkey.tls_ca = Some(ca);
        valkey.restart();
        valkey
    }

    /// A server that is not running yet, on a port nothing listens on (for tests that start
    /// Aura first).
    pub fn stopped() -> Valkey {
        let mut valkey = Valkey::start();
        valkey.stop();
        valkey
    }

    pub fn url(&self) -> String {
        match self.tls_ca {
            Some(_) => format!("rediss://localhost:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// Starts (again) on the same port and directory; returns once it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(server_binary());
        match &self.tls_ca {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some(ca) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(self.dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(self.dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(ca),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the valkey/redis server");
        self.child = Some(child);
        self.wait_for_ping();
    }

    fn wait_for_ping(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.try_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "valkey did not answer on {}",
                self.port
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// Stops the server (its data is on disk); Aura sees its store go away.
    pub fn stop(&mut self) {
        *self.reader.lock().unwrap() = None;
        if let Some(mut child) = self.child.take() {
            if let Ok(mut c) = self.try_connection() {
                let _ = redis::cmd("SHUTDOWN").query::<()>(&mut c);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server (SIGKILL: no shutdown, no last write); its append-only file, written
    /// with `appendfsync always`, keeps every write it acknowledged.
    pub fn kill(&mut self) {
        *self.reader.lock().unwrap() = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server, deletes everything it kept on disk, and starts it again: a store that
    /// restarted without persistence.
    pub fn restart_empty(&mut self) {
        self.stop();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            let keep = path.extension().is_some_and(|e| e == "pem" || e == "key");
            if !keep {
                let _ = std::fs::remove_dir_all(&path);
                let _ = std::fs::remove_file(&path);
            }
        }
        self.restart();
    }

    fn try_connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = match &self.tls_ca {
            None => redis::Client::open(self.url())?,
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            )?,
        };
        client.get_connection_with_timeout(Duration::from_secs(1))
    }

    pub fn connection(&self) -> redis::Connection {
        self.try_connection().expect("connect to valkey")
    }

    /// A hash, as the store keeps it.
    pub fn hash(&self, key: &str) -> HashMap<String, String> {
        let mut reader = self.reader.lock().unwrap();
        let mut retried = false;
        loop {
            let connection = reader.get_or_insert_with(|| self.connection());
            match redis::cmd("HGETALL").arg(key).query(connection) {
                Ok(hash) => return hash,
                // A server restarted under the connection: once more on a new one.
                Err(_) if !retried => {
                    retried = true;
                    *reader = None;
                }
                Err(e) => panic!("HGETALL {key}: {e}"),
            }
        }
    }

    /// `(spent, leased)` of an API key, straight from the store: spend of every period the
    /// store keeps.
    pub fn totals(&self, api_key: &str) -> (u64, u64) {
        let id = aura::auth::KeyId::of(api_key);
        let account = self.hash(&format!("aura:{{{id}}}"));
        let spent = spent_fields(&account);
        let leased = self
            .hash(&format!("aura:{{{id}}}:lease"))
            .values()
            .map(|v| v.parse::<u64>().unwrap())
            .sum();
        (spent, leased)
    }
}

/// The sum of an account hash's `spent:<period>` fields.
pub fn spent_fields(account: &HashMap<String, String>) -> u64 {
    account
        .iter()
        .filter(|(field, _)| field.starts_with("spent:"))
        .map(|(_, v)| v.parse::<u64>().unwrap())
        .sum()
}

impl Drop for Valkey {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Valkey/Redis cluster of `n` primaries on free loopback ports, slots spread by
/// `redis-cli --cluster create`; stopped on drop.
pub struct ValkeyCluster {
    pub nodes: Vec<Valkey>,
}

impl ValkeyCluster {
    pub fn start(n: usize) -> ValkeyCluster {
        let nodes: Vec<Valkey> = (0..n)
            .map(|_| {
                let port = super::dead_port();
                let dir = std::env::temp_dir()
                    .join(format!("aura-valkey-cluster-{}-{port}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                let child = Command::new(server_binary())
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                    // Its bus port, free too (by default port + 10000: taken, or past 65535).
                    .args(["--cluster-port", &super::dead_port().to_string()])
                    .arg("--cluster-config-file")
                    .arg(dir.join("nodes.conf"))
                    .arg("--dir")
                    .arg(&dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start a cluster node");
                let node = Valkey {
                    child: Some(child),
                    reader: std::sync::Mutex::new(None),
                    port,
                    dir,
                    tls_ca: None,
                };
                node.wait_for_ping();
                node
            })
            .collect();
        let cli = if Command::new("valkey-cli").arg("--version").output().is_ok() {
            "valkey-cli"
        } else {
            "redis-cli"
        };
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            created.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = ValkeyCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = cluster.nodes.iter().all(|n| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut n.connection())
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            });
            if ok {
                return cluster;
            }
            assert!(Instant::now() < deadline, "the cluster never became ok");
            std::thread::park_timeout(Duration::from_millis(50));
        }
    }

    /// The first node's URL: Aura finds the rest of the cluster from it.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    pub fn connection(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(vec![self.url()])
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// The spend of an API key (every period), from whichever node owns its slot.
    pub fn spent(&self, api_key: &str) -> u64 {
        let id = aura::auth::KeyId::of(api_key);
        let account: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("aura:{{{id}}}"))
            .query(&mut self.connection())
            .unwrap();
        spent_fields(&account)
    }

    /// Which node holds the account of `api_key`.
    pub fn owner(&self, api_key: &str) -> u16 {
        let id = aura::auth::KeyId::of(api_key);
        let key = format!("aura:{{{id}}}");
        self.nodes
            .iter()
            .find(|n| {
                redis::cmd("EXISTS")
                    .arg(&key)
                    .query::<bool>(&mut n.connection())
                    .unwrap_or(false)
            })
            .map_or(0, |n| n.port)
    }
}

/// A journal directory of its own for this test process, `name` and `driver`, empty.
pub fn journal_dir(name: &str, driver: super::Driver) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "aura-journal-{}-{name}-{driver:?}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Aura in front of `mock` with its budgets in `valkey`, its journal in `journal`, and `flags`.
pub fn on_valkey(
    mock: &super::MockUpstream,
    valkey: &Valkey,
    driver: super::Driver,
    journal: &std::path::Path,
    flags: &[(&str, &str)],
) -> super::Launch {
    let mut launch = super::Launch::new(&mock.url(), driver)
        .arg("--store")
        .arg("valkey")
        .arg("--valkey-url")
        .arg(&valkey.url())
        .arg("--journal-dir")
        .arg(journal.to_str().unwrap());
    for (flag, value) in flags {
        launch = launch.arg(flag).arg(value);
    }
    launch
}

/// A loopback relay in front of a server that can hold back its answers: what a store that
/// applied a command and then went slow looks like to a client (a reply late past its timeout,
/// so the client sends the command again). Each accepted connection is relayed on two threads;
/// answers held when the client gives up are dropped with its connection.
pub struct StallingRelay {
    pub port: u16,
    holding: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stopped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StallingRelay {
    pub fn start(server_port: u16) -> StallingRelay {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let holding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (hold, stop) = (holding.clone(), stopped.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if stop.load(SeqCst) {
                    return;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", server_port)) else {
                    continue;
                };
                let (mut up_in, mut up_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_in, &mut up_out);
                    let _ = up_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut down_in, mut down_out) = (server, client);
                let hold = hold.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    let mut held: Vec<u8> = Vec::new();
                    // A short read timeout, so held answers go out soon after the hold ends.
                    let _ = down_in.set_read_timeout(Some(Duration::from_millis(10)));
                    loop {
                        match down_in.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => held.extend_from_slice(&buf[..n]),
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => break,
                        }
                        if !hold.load(SeqCst) && !held.is_empty() {
                            if down_out.write_all(&held).is_err() {
                                break;
                            }
                            held.clear();
                        }
                    }
                    let _ = down_out.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        StallingRelay {
            port,
            holding,
            stopped,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Answers are held back from now on (commands still reach the server and are applied).
    pub fn hold(&self) {
        self.holding
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.holding
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for StallingRelay {
    fn drop(&mut self) {
        // The accept loop ends at its next connection: this one.
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.release();
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}
