//! `aura-perf json-burst`: Aura's resident memory under a burst of large non-streaming JSON
//! answers (the shape that once held each answer whole to read its usage): `answers` clients
//! at once, each reading an answer of `answer_mib` MiB from a loopback upstream that writes
//! it in 64 KiB pieces, usage last. Reports RSS before, at its peak, and 5 s after.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::procstat::{self, Watch};
use crate::targets;

/// How long after the burst the memory is read again (the pool trims every few seconds).
const AFTER: Duration = Duration::from_secs(5);

pub fn run(aura_bin: &Path, answers: usize, answer_mib: usize) -> std::io::Result<String> {
    let upstream = big_answers(answer_mib)?;
    let aura = targets::aura(aura_bin, upstream, 1, false, None)?;
    let pids = aura.pids();
    std::thread::park_timeout(Duration::from_millis(300));
    let before = procstat::rss_kib(&pids);
    let watch = Watch::start(pids.clone())?;
    let clients: Vec<_> = (0..answers)
        .map(|_| {
            let addr = aura.addr;
            std::thread::spawn(move || ask(addr))
        })
        .collect();
    let mut read = 0usize;
    for client in clients {
        read += client
            .join()
            .map_err(|_| std::io::Error::other("a client panicked"))??;
    }
    let peak = watch.stop().peak_rss_kib;
    std::thread::park_timeout(AFTER);
    let after = procstat::rss_kib(&pids);
    drop(aura);
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(format!(
        "- {answers} concurrent {answer_mib} MiB JSON answers through 1 worker ({:.0} MiB read by \
         the clients): RSS {:.1} MiB before, {:.1} MiB at peak (+{:.1}), {:.1} MiB {}s after\n",
        read as f64 / 1_048_576.0,
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
        mib(after),
        AFTER.as_secs()
    ))
}

/// One request; the whole answer read (its size returned).
fn ask(addr: SocketAddr) -> std::io::Result<usize> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body =
        r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-perf-burst\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

/// A loopback upstream answering every request with one `answer_mib` MiB chat completion.
fn big_answers(answer_mib: usize) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let text = "x".repeat(answer_mib * 1024 * 1024);
    let body = format!(
        r#"{{"id":"chatcmpl-burst","object":"chat.completion","model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}}}"#
    );
    let answer: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    );
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut seen = Vec::new();
                // Each request is small: read until its head's end and its body (no reuse
                // needed: Aura may pool the connection, each answer is whole).
                loop {
                    let Ok(n) = stream.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let Some(head_end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if seen.len() < head_end + 4 + length {
                        continue;
                    }
                    seen.drain(..head_end + 4 + length);
                    for piece in answer.chunks(64 * 1024) {
                        if stream.write_all(piece).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}
