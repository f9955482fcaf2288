//! The spend record: one JSON line per settled request (`spend_record = "/path/spend.jsonl"`,
//! or `"stdout"`): when, the request id, the key (id and alias) and its team, the model asked
//! for and the one that answered, the upstream, the tokens by kind, the cost in nano-dollars,
//! TTFT, duration, status and attempts.
//!
//! Workers hand each line's fields to one writer thread over a channel (never a write, never
//! a wait on the request path); the thread writes and flushes in batches, and rotates a file
//! past `spend_record_max_bytes` (`spend.jsonl` → `spend.jsonl.1` → … up to
//! `spend_record_files`). At SIGTERM the workers end first (their requests finish within the
//! grace, each with its line); the thread then writes every line still queued, fsyncs and
//! exits: nothing is lost but to a kill.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

/// Lines waiting in the writer's buffer are flushed at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Lines the writer may have waiting (a few hundred bytes each): memory stays bounded when
/// the disk or stdout stalls. Past it, a line is dropped, counted and logged, never waited
/// for on the request path.
const QUEUE: usize = 65_536;

/// One settled request.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// RFC 3339, UTC, with milliseconds.
    pub time: String,
    pub request_id: String,
    pub key_id: String,
    pub alias: Option<String>,
    pub team: Option<String>,
    pub route: &'static str,
    /// As the client asked.
    pub model_requested: Option<String>,
    /// As the answer named it.
    pub model_answered: Option<String>,
    pub upstream: Option<String>,
    pub tokens: Tokens,
    pub cost_nano: u64,
    /// `reported` (the upstream's usage), `estimated` (none came) or `implausible`.
    pub basis: &'static str,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    pub status: u16,
    pub attempts: u32,
    pub stream: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached_prompt: u64,
    pub cache_write_prompt: u64,
    pub media_prompt: u64,
}

/// Where the record goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File {
        path: PathBuf,
        max_bytes: u64,
        /// Rotated files kept beside the current one.
        keep: usize,
    },
}

/// What the writer thread is sent.
enum Message {
    Line(Box<Line>),
    /// Every worker has ended: write what came before, sync, stop.
    Finish,
}

/// A worker's handle on the record: sends never block.
#[derive(Debug, Clone)]
pub struct Recorder {
    lines: SyncSender<Message>,
    /// Lines dropped because the writer's queue was full.
    dropped: std::sync::Arc<AtomicU64>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Message::Line(_) => "Line",
            Message::Finish => "Finish",
        })
    }
}

impl Recorder {
    pub fn record(&self, line: Line) {
        match self.lines.try_send(Message::Line(Box::new(line))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::error!(
                        dropped,
                        "spend record: the writer is behind (a stalled disk?): lines dropped"
                    );
                }
            }
            // The writer outlives every worker (it finishes after them): it died, and logged why.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// The count of lines dropped because the writer was behind (for metrics).
    pub fn dropped(&self) -> std::sync::Arc<AtomicU64> {
        self.dropped.clone()
    }
}

/// The writer thread.
pub struct Writer {
    thread: JoinHandle<()>,
    /// To tell it to finish: recorders may outlive their workers (a task a runtime never
    /// dropped), so the end is said, not inferred from the last sender going.
    finish: SyncSender<Message>,
}

impl Writer {
    /// Opens the target (a file's directory made, the file appended to) and starts the
    /// thread; the recorder is cloned for each worker.
    pub fn start(target: Target) -> io::Result<(Writer, Recorder)> {
        let sink = Sink::open(target)?;
        let (lines, queue) = mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("aura-spend-record".into())
            .spawn(move || write_lines(sink, queue))?;
        let finish = lines.clone();
        let dropped = std::sync::Arc::default();
        Ok((Writer { thread, finish }, Recorder { lines, dropped }))
    }

    /// Writes every line sent before this call, syncs and stops the thread: call once the
    /// workers have ended.
    pub fn finish(self) {
        let _ = self.finish.send(Message::Finish);
        let _ = self.thread.join();
    }
}

fn write_lines(mut sink: Sink, queue: Receiver<Message>) {
    let mut buffered = false;
    loop {
        match queue.recv_timeout(FLUSH_EVERY) {
            Ok(Message::Finish) => break,
            Ok(Message::Line(line)) => {
                if let Err(e) = sink.write(&line) {
                    tracing::error!(error = %e, "spend record: a line could not be written");
                }
                buffered = true;
            }
            Err(RecvTimeoutError::Timeout) if buffered => {
                sink.flush();
                buffered = false;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    sink.flush();
    sink.sync();
}

enum Sink {
    Stdout(io::Stdout),
    File {
        /// None after a failed open: the next line tries again.
        out: Option<BufWriter<File>>,
        path: PathBuf,
        written: u64,
        max_bytes: u64,
        keep: usize,
    },
}

impl Sink {
    fn open(target: Target) -> io::Result<Sink> {
        match target {
            Target::Stdout => Ok(Sink::Stdout(io::stdout())),
            Target::File {
                path,
                max_bytes,
                keep,
            } => {
                let file = append(&path)?;
                let written = file.metadata()?.len();
                Ok(Sink::File {
                    out: Some(BufWriter::new(file)),
                    path,
                    written,
                    max_bytes,
                    keep,
                })
            }
        }
    }

    fn write(&mut self, line: &Line) -> io::Result<()> {
        let mut text = serde_json::to_vec(line).map_err(io::Error::other)?;
        text.push(b'\n');
        match self {
            Sink::Stdout(out) => out.lock().write_all(&text),
            Sink::File {
                out,
                path,
                written,
                max_bytes,
                keep,
            } => {
                if *written > 0 && *written + text.len() as u64 > *max_bytes {
                    if let Some(full) = out.take() {
                        let synced = full
                            .into_inner()
                            .map_err(|e| e.into_error())
                            .and_then(|f| f.sync_all());
                        if let Err(e) = synced {
                            tracing::error!(error = %e, "spend record: the full file could not be flushed");
                        }
                    }
                    // A rotation that fails (a file moved away with none kept, a full disk)
                    // leaves the record going on in the current file, tried again only when
                    // it fills once more.
                    *written = 0;
                    if let Err(e) = rotate(path, *keep) {
                        tracing::error!(error = %e, "spend record: rotation failed; going on in the current file");
                    }
                }
                // Opened again after a rotation, a failed open, or a file moved away (a
                // logrotate that renames it): the record goes on in a file at `path`.
                if out.is_none() || !path.exists() {
                    if let Some(moved) = out.take() {
                        let _ = moved.into_inner().map(|f| f.sync_all());
                    }
                    let file = append(path)?;
                    *written = file.metadata()?.len();
                    *out = Some(BufWriter::new(file));
                }
                let Some(writer) = out.as_mut() else {
                    return Ok(());
                };
                writer.write_all(&text)?;
                *written += text.len() as u64;
                Ok(())
            }
        }
    }

    fn flush(&mut self) {
        let flushed = match self {
            Sink::Stdout(out) => out.lock().flush(),
            Sink::File { out, .. } => out.as_mut().map_or(Ok(()), |out| out.flush()),
        };
        if let Err(e) = flushed {
            tracing::error!(error = %e, "spend record: lines could not be flushed");
        }
    }

    fn sync(&mut self) {
        if let Sink::File { out: Some(out), .. } = self {
            if let Err(e) = out.get_ref().sync_all() {
                tracing::error!(error = %e, "spend record: the file could not be synced");
            }
        }
    }
}

fn append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// `path` → `path.1`, each `path.n` → `path.n+1`; the oldest beyond `keep` is deleted.
fn rotate(path: &Path, keep: usize) -> io::Result<()> {
    let numbered = |n: usize| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if keep == 0 {
        return match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let _ = fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let from = numbered(n);
        if from.exists() {
            fs::rename(&from, numbered(n + 1))?;
        }
    }
    // Moved away already (by an operator's logrotate): nothing to move.
    match fs::rename(path, numbered(1)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: u64) -> Line {
        Line {
            time: "2026-12-01T00:00:00.000Z".into(),
            request_id: format!("req-{n}"),
            key_id: "00112233445566ff".into(),
            alias: Some("alice".into()),
            team: None,
            route: "chat",
            model_requested: Some("gpt-4o-mini".into()),
            model_answered: Some("gpt-4o-mini-2024-07-18".into()),
            upstream: Some("openai".into()),
            tokens: Tokens::default(),
            cost_nano: n,
            basis: "reported",
            ttft_ms: Some(1.5),
            duration_ms: 2.0,
            status: 200,
            attempts: 1,
            stream: true,
        }
    }

    #[test]
    fn lines_rotate_by_size_and_none_is_lost() {
        let dir = std::env::temp_dir().join(format!("aura-spend-record-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("spend.jsonl");
        let (writer, recorder) = Writer::start(Target::File {
            path: path.clone(),
            max_bytes: 2_000,
            keep: 50,
        })
        .unwrap();
        for n in 1..=100 {
            recorder.record(line(n));
        }
        drop(recorder);
        writer.finish();
        let mut costs = Vec::new();
        let mut files = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            files += 1;
            let text = fs::read_to_string(entry.unwrap().path()).unwrap();
            assert!(text.len() <= 2_000 || text.lines().count() == 1);
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                costs.push(v["cost_nano"].as_u64().unwrap());
            }
        }
        costs.sort();
        assert_eq!(costs, (1..=100).collect::<Vec<_>>());
        assert!(files > 2, "{files} files");
        // Only `keep` rotated files stay.
        let _ = fs::remove_dir_all(&dir);
        let (writer, recorder) = Writer::start(Target::File {
            path: path.clone(),
            max_bytes: 2_000,
            keep: 2,
        })
        .unwrap();
        for n in 1..=100 {
            recorder.record(line(n));
        }
        drop(recorder);
        writer.finish();
        assert!(!dir.join("spend.jsonl.3").exists());
        assert!(dir.join("spend.jsonl.2").exists());
        // The current file moved away (logrotate's default): lines go on into a new one, and
        // none is lost.
        let _ = fs::remove_dir_all(&dir);
        let (writer, recorder) = Writer::start(Target::File {
            path: path.clone(),
            max_bytes: 2_000,
            keep: 50,
        })
        .unwrap();
        recorder.record(line(1));
        std::thread::park_timeout(Duration::from_millis(300));
        fs::rename(&path, dir.join("moved.jsonl")).unwrap();
        for n in 2..=40 {
            recorder.record(line(n));
        }
        drop(recorder);
        writer.finish();
        let all: usize = fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                fs::read_to_string(e.unwrap().path())
                    .unwrap()
                    .lines()
                    .count()
            })
            .sum();
        let moved = fs::read_to_string(dir.join("moved.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert_eq!((moved, all), (1, 40));
        let _ = fs::remove_dir_all(&dir);
    }
}
