//! A load of streamed chat completions that survives the gateway being killed under it: each
//! request carries an `x-test-id` (Aura forwards it, the mock records it), and each client
//! notes whether it received its whole answer. The money tests compare what the store holds
//! with what the mock reported for the answers clients received in full.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::billing::{cost, mock_usage, EMBED_IN, MINI_IN, MINI_OUT};
use super::{find, Recorded, CHAT};

/// How one request ended, as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    /// The whole response: a 200 and the body's last chunk.
    Complete,
    /// A 200 whose body was cut (the gateway died).
    Cut,
    /// Refused or failed with this status.
    Status(u16),
    /// No connection, or it died before any answer.
    Nothing,
}

/// One request sent, and how it ended.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub id: u64,
    pub key: usize,
    pub got: Got,
}

/// A small deterministic generator (the seed is printed, so a failure can be replayed).
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        println!("rng seed {seed}");
        Rng(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The kinds of request a load mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Streamed chat completion; Aura asks for the usage event and strips it.
    Stream,
    /// Streamed chat completion whose client asks for the usage event itself.
    StreamWithUsage,
    /// Whole chat completion.
    Whole,
    /// Whole Responses API answer.
    Responses,
    /// Embeddings (no completion tokens).
    Embeddings,
    /// The upstream fails (500): nothing is billed.
    UpstreamError,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Stream,
        Kind::StreamWithUsage,
        Kind::Whole,
        Kind::Responses,
        Kind::Embeddings,
        Kind::UpstreamError,
    ];

    fn target_and_body(self) -> (&'static str, &'static str) {
        match self {
            Kind::Stream => (
                CHAT,
                r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"stream":true}"#,
            ),
            Kind::StreamWithUsage => (
                CHAT,
                r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            Kind::Whole | Kind::UpstreamError => (
                CHAT,
                r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there"}]}"#,
            ),
            Kind::Responses => (
                "/v1/responses",
                r#"{"model":"gpt-4o-mini","input":"Say hello, please"}"#,
            ),
            Kind::Embeddings => (
                "/v1/embeddings",
                r#"{"model":"text-embedding-3-small","input":["one","two"]}"#,
            ),
        }
    }
}

/// One streamed chat completion, client side. Never panics: a dead gateway is an outcome.
pub fn stream_once(addr: SocketAddr, api_key: &str, id: u64, chunks: u64, delay_ms: u64) -> Got {
    request_once(addr, api_key, id, Kind::Stream, chunks, delay_ms)
}

/// One request of `kind`, client side. Never panics: a dead gateway is an outcome. The answer
/// is complete when a chunked body's last chunk, or all of a sized body, has arrived.
pub fn request_once(
    addr: SocketAddr,
    api_key: &str,
    id: u64,
    kind: Kind,
    chunks: u64,
    delay_ms: u64,
) -> Got {
    let (target, body) = kind.target_and_body();
    let status = if kind == Kind::UpstreamError {
        "x-mock-status: 500\r\n"
    } else {
        ""
    };
    let request = format!(
        "POST {target} HTTP/1.1\r\nhost: aura\r\nauthorization: Bearer {api_key}\r\ncontent-type: application/json\r\nx-test-id: {id}\r\nx-mock-chunks: {chunks}\r\nx-mock-delay-ms: {delay_ms}\r\n{status}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return Got::Nothing;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if stream.write_all(request.as_bytes()).is_err() {
        return Got::Nothing;
    }
    let mut received = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
        let Some(head_end) = find(&received, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = &received[head_end + 4..];
        let whole = if head.contains("transfer-encoding: chunked") {
            body.ends_with(b"\r\n0\r\n\r\n") || body == b"0\r\n\r\n"
        } else {
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            body.len() >= length
        };
        if whole {
            return if status == 200 {
                Got::Complete
            } else {
                Got::Status(status)
            };
        }
    }
    if received.starts_with(b"HTTP/1.1 200") {
        Got::Cut
    } else {
        Got::Nothing
    }
}

/// Clients streaming on `keys` until `stop` is set (or the gateway stops answering), each
/// request with its own id, 3 to 8 events, 2 to 10 ms apart.
pub struct Load {
    pub sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Clients streaming chat completions.
    pub fn start(
        addr: SocketAddr,
        keys: &[String],
        clients: usize,
        next_id: Arc<AtomicU64>,
    ) -> Load {
        Load::mixed(addr, keys, clients, next_id, &[Kind::Stream])
    }

    /// Clients sending requests of `kinds` (each picked at random).
    pub fn mixed(
        addr: SocketAddr,
        keys: &[String],
        clients: usize,
        next_id: Arc<AtomicU64>,
        kinds: &[Kind],
    ) -> Load {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|c| {
                let (sent, stop, next_id) = (sent.clone(), stop.clone(), next_id.clone());
                let keys = keys.to_vec();
                let kinds = kinds.to_vec();
                std::thread::spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((c as u64 + 1) * 0x1000_0001));
                    while !stop.load(Ordering::Relaxed) {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let key = rng.below(keys.len() as u64) as usize;
                        let kind = kinds[rng.below(kinds.len() as u64) as usize];
                        let (chunks, delay) = (3 + rng.below(6), 2 + rng.below(9));
                        let got = request_once(addr, &keys[key], id, kind, chunks, delay);
                        sent.lock().unwrap().push(Sent { id, key, got });
                        if got == Got::Nothing {
                            break;
                        }
                    }
                })
            })
            .collect();
        Load {
            sent,
            stop,
            threads,
        }
    }

    /// Stops the clients and waits for them; what they sent.
    pub fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let sent = self.sent.lock().unwrap().clone();
        sent
    }

    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.sent.lock().unwrap().len()
    }
}

/// What the mock reported for each request it answered, by test id: chat completions and
/// responses at gpt-4o-mini's prices, embeddings at text-embedding-3-small's, errors nothing.
pub fn mock_costs(requests: &[Recorded]) -> std::collections::HashMap<u64, u64> {
    requests
        .iter()
        .filter_map(|r| {
            let id = r.header("x-test-id")?.parse().ok()?;
            let (p, c) = mock_usage(r);
            let cost = if r.header("x-mock-status").is_some() {
                0
            } else if r.target.ends_with("/embeddings") {
                cost(p, 0, EMBED_IN, 0)
            } else {
                cost(p, c, MINI_IN, MINI_OUT)
            };
            Some((id, cost))
        })
        .collect()
}

/// Whether `diff` is the sum of some of `costs` (a few at most: brute force).
pub fn is_subset_sum(diff: u64, costs: &[u64]) -> bool {
    assert!(costs.len() <= 20, "{} costs to combine", costs.len());
    (0u32..1 << costs.len()).any(|mask| {
        costs
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, c)| c)
            .sum::<u64>()
            == diff
    })
}
