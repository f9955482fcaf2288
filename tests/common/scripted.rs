//! An upstream that misbehaves on purpose: a loopback listener whose every connection reads
//! requests in turn (head, then a Content-Length body) and hands each to the test's `answer`,
//! which writes what it likes on the raw socket, when it likes (stray bytes after an answer, a
//! close without one). Every request received is counted, with the connection it came on.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the upstream read it.
#[derive(Debug, Clone)]
pub struct Asked {
    /// The connection's number (from 0, in accept order) and the request's on it.
    pub connection: usize,
    pub nth: usize,
    /// The head, lower-cased.
    pub head: String,
}

impl Asked {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == name).then(|| v.trim().to_string())
        })
    }
}

/// What the script does after answering: keep reading the connection, or close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Next,
    Close,
}

pub struct Scripted {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<Asked>>>,
}

impl Scripted {
    pub fn start(
        answer: impl Fn(&Asked, &mut TcpStream) -> Then + Send + Sync + 'static,
    ) -> Scripted {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let log = asked.clone();
        std::thread::spawn(move || {
            for (connection, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let (answer, log) = (answer.clone(), log.clone());
                std::thread::spawn(move || {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    let mut buf = Vec::new();
                    for nth in 0.. {
                        let Some(head) = read_request(&mut stream, &mut buf) else {
                            return;
                        };
                        let request = Asked {
                            connection,
                            nth,
                            head,
                        };
                        log.lock().unwrap().push(request.clone());
                        if answer(&request, &mut stream) == Then::Close {
                            return;
                        }
                    }
                });
            }
        });
        Scripted { addr, asked }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far.
    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

/// Reads one request (head and Content-Length body) off `stream`; `None` once it closes.
pub fn read_request(stream: &mut impl Read, buf: &mut Vec<u8>) -> Option<String> {
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = super::find(buf, b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut tmp).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + length {
        let n = stream.read(&mut tmp).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&tmp[..n]);
    }
    buf.drain(..head_end + length);
    Some(head)
}

/// A whole JSON answer whose body names `id`.
pub fn json_answer(id: &str) -> Vec<u8> {
    let body = format!(r#"{{"id":"{id}"}}"#);
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A JSON error answer: `status` is the status line's code and reason (`503 Service
/// Unavailable`), `headers` any more head lines, each ended by `\r\n`.
pub fn json_error(status: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An upstream that answers every request 503, overloaded.
pub fn overloaded() -> Scripted {
    Scripted::start(|_, stream| {
        let body = r#"{"error":{"message":"overloaded"}}"#;
        send(stream, &json_error("503 Service Unavailable", "", body));
        Then::Next
    })
}

/// Writes `bytes` and flushes; a client that left is no failure of the script.
pub fn send(stream: &mut TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes);
    let _ = stream.flush();
}
