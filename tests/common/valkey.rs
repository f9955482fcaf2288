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
    pub port: u16,
    pub dir: PathBuf,
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
        let port = super::dead_port();
        let dir = std::env::temp_dir().join(format!("aura-valkey-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut valkey = Valkey {
            child: None,
            port,
            dir,
        };
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
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts (again) on the same port and directory; returns once it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(server_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the valkey/redis server");
        self.child = Some(child);
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
        if let Some(mut child) = self.child.take() {
            if let Ok(mut c) = self.try_connection() {
                let _ = redis::cmd("SHUTDOWN").query::<()>(&mut c);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn try_connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(1))
    }

    pub fn connection(&self) -> redis::Connection {
        self.try_connection().expect("connect to valkey")
    }

    /// A hash, as the store keeps it.
    pub fn hash(&self, key: &str) -> HashMap<String, String> {
        redis::cmd("HGETALL")
            .arg(key)
            .query(&mut self.connection())
            .unwrap()
    }

    /// `(spent, leased)` of an API key, straight from the store.
    pub fn totals(&self, api_key: &str) -> (u64, u64) {
        let id = aura::auth::KeyId::of(api_key);
        let account = self.hash(&format!("aura:{{{id}}}"));
        let spent = account.get("spent").map_or(0, |s| s.parse().unwrap());
        let leased = self
            .hash(&format!("aura:{{{id}}}:lease"))
            .values()
            .map(|v| v.parse::<u64>().unwrap())
            .sum();
        (spent, leased)
    }
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
