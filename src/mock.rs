//! The project's OpenAI-compatible mock upstream: serves `aura --demo` and the tests. It runs on
//! a thread of its own with its own monoio runtime and answers chat completions (streamed exactly
//! as OpenAI streams them, or whole), legacy completions, the Responses API (whole, or streamed
//! with its usage in `response.completed`), embeddings, a model list, and echoes any other
//! request.
//! Deterministic: ids, timestamps and token counts follow from the request, so tests can compute
//! what to expect. Per-request `x-mock-*` headers override the options: chunk count, delay,
//! error status, mid-stream reset, ignoring `stream_options`. Every request is recorded.
//! Not on the hot path: bodies are parsed with serde_json. Depends on `server` and below only.

pub mod anthropic;
pub mod demo;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{Method, StatusCode};
use monoio::io::AsyncWriteRent;
use serde_json::{json, Value};

use crate::config::{Limits, Timeouts};
use crate::http::chunked::{encode_chunk, LAST_CHUNK};
use crate::http::{self as h1, RequestHead};
use crate::net;
use crate::server::{self, Handler, Persist, Reply, Request};

/// Content chunks per streamed answer.
pub const CHUNKS_HEADER: &str = "x-mock-chunks";
/// Milliseconds between streamed events (and before a whole answer).
pub const DELAY_MS_HEADER: &str = "x-mock-delay-ms";
/// Answer with this status and an OpenAI-style error body instead.
pub const STATUS_HEADER: &str = "x-mock-status";
/// Streaming: close the connection after this many events, without the last chunk.
pub const RESET_AFTER_HEADER: &str = "x-mock-reset-after";
/// `1`: ignore `stream_options`, like a provider that does not honour it.
pub const NO_USAGE_HEADER: &str = "x-mock-no-usage";
/// Streaming: milliseconds between the last event (`[DONE]`) and the body's end (an upstream
/// that ends its chunked body late: its client already has the whole answer).
pub const END_DELAY_MS_HEADER: &str = "x-mock-end-delay-ms";
/// Chat completions: answer as this model (an upstream that serves another model than asked).
pub const MODEL_HEADER: &str = "x-mock-model";
/// Chat completions: report `PROMPT,COMPLETION` tokens, whatever was sent (a lying upstream).
pub const USAGE_HEADER: &str = "x-mock-usage";
/// Anthropic Messages answers: prompt tokens written to (and read from) the cache.
pub const CACHE_WRITE_HEADER: &str = "x-mock-cache-write";
pub const CACHE_READ_HEADER: &str = "x-mock-cache-read";
/// Anthropic Messages answers: web searches a server tool ran.
pub const WEB_SEARCHES_HEADER: &str = "x-mock-web-searches";

/// `created` of every answer: fixed so answers are byte-for-byte reproducible.
const CREATED: u64 = 1_732_000_000;
const CHAT_ID: &str = "chatcmpl-mock";
const FINGERPRINT: &str = "fp_mock";
const EMBEDDING: [f32; 8] = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875];

const LIMITS: Limits = Limits {
    max_head_bytes: 64 * 1024,
    max_headers: 200,
    max_body_bytes: 64 * 1024 * 1024,
};
const TIMEOUTS: Timeouts = Timeouts {
    client_head: Duration::from_secs(10),
    idle: Duration::from_secs(60),
    client_send: Duration::from_secs(60),
    upstream_connect: Duration::from_secs(10),
    upstream_first_byte: Duration::from_secs(10),
    upstream_read: Duration::from_secs(10),
};

#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Content chunks per streamed answer (`tok0 `, `tok1 `, ...); also the completion tokens.
    pub chunks: usize,
    /// Pause between streamed events, and before a whole (non-streamed) answer.
    pub delay: Duration,
    /// Send the usage chunk when a request asks for `stream_options.include_usage`.
    pub honour_stream_options: bool,
    /// The `model` every answer names.
    pub model: String,
    /// The share of requests answered `503` (drawn at random): the demo's flaky upstream.
    pub failure_ratio: f64,
}

impl Default for MockOptions {
    fn default() -> MockOptions {
        MockOptions {
            chunks: 5,
            delay: Duration::ZERO,
            honour_stream_options: true,
            model: "gpt-4o-mini-2024-07-18".to_string(),
            failure_ratio: 0.0,
        }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    /// Names lower-case, in the order received; values decoded lossily.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

type Log = Arc<Mutex<Vec<Recorded>>>;

/// A handle on a running mock. Its thread lives as long as the process.
pub struct MockUpstream {
    pub addr: SocketAddr,
    requests: Log,
}

impl MockUpstream {
    /// Binds `listen` (port 0 picks a free port) and returns once the mock is accepting.
    pub fn start(listen: SocketAddr, options: MockOptions) -> io::Result<MockUpstream> {
        MockUpstream::start_with(listen, options, None)
    }

    /// The same mock behind TLS (rustls): for tests of Aura's https upstreams.
    pub fn start_tls(
        listen: SocketAddr,
        options: MockOptions,
        tls: Arc<rustls::ServerConfig>,
    ) -> io::Result<MockUpstream> {
        MockUpstream::start_with(listen, options, Some(tls))
    }

    fn start_with(
        listen: SocketAddr,
        options: MockOptions,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<MockUpstream> {
        let listener = std::net::TcpListener::bind(listen)?;
        // As monoio's own bind does: the epoll driver needs it, io_uring does not mind.
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let requests = Log::default();
        let log = requests.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("aura-mock".into())
            .spawn(move || run(listener, options, log, tls, ready_tx))?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("mock upstream thread ended before listening"))??;
        Ok(MockUpstream { addr, requests })
    }

    /// The base URL to point a client (or Aura's `--upstream-url`) at: `http://ADDR/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.requests).clone()
    }
}

fn lock(log: &Log) -> MutexGuard<'_, Vec<Recorded>> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn run(
    listener: std::net::TcpListener,
    options: MockOptions,
    log: Log,
    tls: Option<Arc<rustls::ServerConfig>>,
    ready: mpsc::Sender<io::Result<()>>,
) {
    let acceptor = tls.map(monoio_rustls::TlsAcceptor::from);
    let mut runtime = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match monoio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let handler = Rc::new(MockHandler::new(options, log));
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let handler = handler.clone();
                    let acceptor = acceptor.clone();
                    monoio::spawn(async move {
                        match acceptor {
                            None => server::serve_connection(stream, &*handler, LIMITS, TIMEOUTS).await,
                            Some(acceptor) => match acceptor.accept(stream).await {
                                Ok(tls) => server::serve_connection(tls, &*handler, LIMITS, TIMEOUTS).await,
                                Err(e) => tracing::warn!(error = %e, "mock upstream: TLS handshake failed"),
                            },
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mock upstream: accept failed");
                    // Out of descriptors and the like: do not spin.
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
}

/// The options after a request's `x-mock-*` headers.
struct Control {
    chunks: usize,
    delay: Duration,
    status: Option<StatusCode>,
    reset_after: Option<usize>,
    honour_stream_options: bool,
    /// The answer's model, JSON-escaped, when not the mock's own.
    model: Option<String>,
    /// (prompt, completion) tokens to report instead of the real counts.
    usage: Option<(u64, u64)>,
    /// Before the body's last chunk.
    end_delay: Duration,
    /// Anthropic answers: cache writes and reads, and web searches, to report.
    cache_write: u64,
    cache_read: u64,
    web_searches: u64,
}

impl Control {
    fn new(head: &RequestHead, options: &MockOptions) -> Control {
        let number = |name: &str| -> Option<u64> {
            head.headers.get(name)?.to_str().ok()?.trim().parse().ok()
        };
        let status = number(STATUS_HEADER)
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .filter(|s| *s != StatusCode::OK);
        let no_usage = head
            .headers
            .get(NO_USAGE_HEADER)
            .is_some_and(|v| !matches!(v.as_bytes(), b"0" | b"false"));
        let text = |name: &str| head.headers.get(name)?.to_str().ok().map(str::trim);
        let usage = text(USAGE_HEADER).and_then(|v| {
            let (prompt, completion) = v.split_once(',')?;
            Some((prompt.trim().parse().ok()?, completion.trim().parse().ok()?))
        });
        Control {
            chunks: number(CHUNKS_HEADER).map_or(options.chunks, |n| n as usize),
            delay: number(DELAY_MS_HEADER).map_or(options.delay, Duration::from_millis),
            status,
            reset_after: number(RESET_AFTER_HEADER).map(|n| n as usize),
            honour_stream_options: options.honour_stream_options && !no_usage,
            model: text(MODEL_HEADER).map(|m| Value::String(m.to_string()).to_string()),
            usage,
            end_delay: number(END_DELAY_MS_HEADER).map_or(Duration::ZERO, Duration::from_millis),
            cache_write: number(CACHE_WRITE_HEADER).unwrap_or(0),
            cache_read: number(CACHE_READ_HEADER).unwrap_or(0),
            web_searches: number(WEB_SEARCHES_HEADER).unwrap_or(0),
        }
    }
}

struct MockHandler {
    /// The model name as a JSON string (escaped once).
    model: String,
    options: MockOptions,
    log: Log,
    /// xorshift state for `failure_ratio`'s draws.
    rng: std::sync::atomic::AtomicU64,
}

impl MockHandler {
    fn new(options: MockOptions, log: Log) -> MockHandler {
        let model = Value::String(options.model.clone()).to_string();
        MockHandler {
            model,
            options,
            log,
            rng: std::sync::atomic::AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        }
    }

    /// Whether this request is one `failure_ratio` fails.
    fn fails(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.options.failure_ratio <= 0.0 {
            return false;
        }
        let mut x = self.rng.load(Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Relaxed);
        ((x >> 11) as f64 / (1u64 << 53) as f64) < self.options.failure_ratio
    }

    fn record(&self, request: &Request) {
        let head = &request.head;
        let headers = head
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        lock(&self.log).push(Recorded {
            method: head.method.to_string(),
            target: head.target.clone(),
            headers,
            body: request.body.clone(),
        });
    }
}

impl<S: AsyncWriteRent> Handler<S> for MockHandler {
    async fn handle(&self, request: Request, keep_alive: bool, client: &mut S) -> Persist {
        self.record(&request);
        let control = Control::new(&request.head, &self.options);
        let drawn = self.fails().then_some(StatusCode::SERVICE_UNAVAILABLE);
        if let Some(status) = control.status.or(drawn) {
            return reply_json(client, status, &error_body(status), keep_alive).await;
        }
        let path = request.head.target.split('?').next().unwrap_or_default();
        let method = &request.head.method;
        let chat = path.ends_with("/chat/completions");
        let responses = path.ends_with("/responses");
        if *method == Method::POST && (chat || responses || path.ends_with("/v1/completions")) {
            let Ok(json) = serde_json::from_slice::<Value>(&request.body) else {
                let body = openai_error("mock: request body is not JSON", "invalid_request_error");
                return reply_json(client, StatusCode::BAD_REQUEST, &body, keep_alive).await;
            };
            let prompt = prompt_tokens(&request.body);
            return if chat {
                self.chat(&json, prompt, &control, keep_alive, client).await
            } else {
                self.legacy_or_responses(responses, &json, prompt, &control, keep_alive, client)
                    .await
            };
        }
        if *method == Method::POST && path.ends_with("/v1/messages/count_tokens") {
            let body = anthropic::count_tokens(prompt_tokens(&request.body));
            return reply_json(client, StatusCode::OK, &body, keep_alive).await;
        }
        if *method == Method::POST && path.ends_with("/v1/messages") {
            return self.messages(&request, &control, keep_alive, client).await;
        }
        if *method == Method::POST && path.ends_with("/audio/speech") {
            // Binary audio, no usage: what text to speech answers.
            sleep(control.delay).await;
            let audio = vec![0x49u8; 256];
            return server::write_body(
                client,
                StatusCode::OK,
                "audio/mpeg",
                &audio,
                Reply::new(keep_alive),
                TIMEOUTS.client_send,
            )
            .await;
        }
        let (status, body) = if *method == Method::POST && path.ends_with("/embeddings") {
            embeddings(&request.body)
        } else if *method == Method::POST && path.contains("/images/") {
            (StatusCode::OK, images(&request))
        } else if *method == Method::POST
            && (path.ends_with("/audio/transcriptions") || path.ends_with("/audio/translations"))
        {
            (StatusCode::OK, transcription(&request))
        } else if *method == Method::GET && path.ends_with("/models") {
            (StatusCode::OK, self.models())
        } else {
            (StatusCode::OK, echo(&request))
        };
        sleep(control.delay).await;
        reply_json(client, status, &body, keep_alive).await
    }
}

impl MockHandler {
    async fn chat<S: AsyncWriteRent>(
        &self,
        request: &Value,
        prompt_tokens: u64,
        control: &Control,
        keep_alive: bool,
        client: &mut S,
    ) -> Persist {
        let (prompt_tokens, completion_tokens) = control
            .usage
            .unwrap_or((prompt_tokens, control.chunks as u64));
        let model = control.model.as_deref().unwrap_or(&self.model);
        if request.get("stream") != Some(&Value::Bool(true)) {
            sleep(control.delay).await;
            let answer = self.completion(control.chunks, model, (prompt_tokens, completion_tokens));
            return reply_json(client, StatusCode::OK, &answer, keep_alive).await;
        }
        let asked = request.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        let usage =
            (asked && control.honour_stream_options).then_some((prompt_tokens, completion_tokens));
        let events = self.stream_events(control.chunks, model, usage);
        write_stream(&events, control, keep_alive, client).await
    }

    /// Anthropic's `/v1/messages`: the model asked answers, whole or streamed, its usage as
    /// `anthropic::MessagesUsage` says (the input less what the cache counts took).
    async fn messages<S: AsyncWriteRent>(
        &self,
        request: &Request,
        control: &Control,
        keep_alive: bool,
        client: &mut S,
    ) -> Persist {
        let Ok(json) = serde_json::from_slice::<Value>(&request.body) else {
            let body = anthropic::error("invalid_request_error", "mock: body is not JSON");
            return reply_json(client, StatusCode::BAD_REQUEST, &body, keep_alive).await;
        };
        let usage = anthropic::MessagesUsage {
            input: prompt_tokens(&request.body),
            cache_write: control.cache_write,
            cache_read: control.cache_read,
            output: control.chunks as u64,
            web_searches: control.web_searches,
        };
        let asked = json
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("claude-mock");
        let model = match &control.model {
            Some(escaped) => serde_json::from_str::<String>(escaped).unwrap_or_default(),
            None => asked.to_string(),
        };
        if json.get("stream") != Some(&Value::Bool(true)) {
            sleep(control.delay).await;
            let body = anthropic::message(&model, control.chunks, usage);
            return reply_json(client, StatusCode::OK, &body, keep_alive).await;
        }
        let events = anthropic::stream_events(&model, control.chunks, usage);
        write_stream(&events, control, keep_alive, client).await
    }

    /// `/v1/completions` (whole answers) and `/v1/responses` (whole, or streamed with the usage
    /// in `response.completed`), with the same usage rule as chat completions.
    async fn legacy_or_responses<S: AsyncWriteRent>(
        &self,
        responses: bool,
        request: &Value,
        prompt: u64,
        control: &Control,
        keep_alive: bool,
        client: &mut S,
    ) -> Persist {
        let completion = control.chunks as u64;
        let text: String = (0..control.chunks).map(token).collect();
        let model: Value = serde_json::from_str(&self.model).unwrap_or(Value::Null);
        if !responses {
            let answer = json!({
                "id": "cmpl-mock", "object": "text_completion", "created": CREATED, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion},
            });
            sleep(control.delay).await;
            return reply_json(
                client,
                StatusCode::OK,
                answer.to_string().as_bytes(),
                keep_alive,
            )
            .await;
        }
        let response = |status: &str, usage: Value| {
            json!({
                "id": "resp_mock", "object": "response", "created_at": CREATED, "status": status,
                "model": model,
                "output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": text}]}],
                "usage": usage,
            })
        };
        let usage = json!({"input_tokens": prompt, "output_tokens": completion,
                           "total_tokens": prompt + completion,
                           "input_tokens_details": {"cached_tokens": 0}});
        if request.get("stream") != Some(&Value::Bool(true)) {
            sleep(control.delay).await;
            let answer = response("completed", usage).to_string();
            return reply_json(client, StatusCode::OK, answer.as_bytes(), keep_alive).await;
        }
        let event =
            |kind: &str, data: Value| format!("event: {kind}\ndata: {data}\n\n").into_bytes();
        let mut events = vec![event(
            "response.created",
            json!({"type": "response.created", "response": response("in_progress", Value::Null)}),
        )];
        for i in 0..control.chunks {
            events.push(event(
                "response.output_text.delta",
                json!({"type": "response.output_text.delta", "delta": token(i)}),
            ));
        }
        events.push(event(
            "response.completed",
            json!({"type": "response.completed", "response": response("completed", usage)}),
        ));
        write_stream(&events, control, keep_alive, client).await
    }
}

/// Writes a streamed answer: the head, then each event as a chunk, `control.delay` apart (and
/// cut short at `control.reset_after`).
/// A JSON answer on `client`'s connection.
async fn reply_json<S: AsyncWriteRent>(
    client: &mut S,
    status: StatusCode,
    body: &[u8],
    keep_alive: bool,
) -> Persist {
    server::write_json(
        client,
        status,
        body,
        Reply::new(keep_alive),
        TIMEOUTS.client_send,
    )
    .await
}

async fn write_stream<S: AsyncWriteRent>(
    events: &[Vec<u8>],
    control: &Control,
    keep_alive: bool,
    client: &mut S,
) -> Persist {
    let mut out = Vec::with_capacity(256);
    h1::write_status_line(StatusCode::OK, &mut out);
    h1::write_header("content-type", b"text/event-stream", &mut out);
    h1::write_header("cache-control", b"no-cache", &mut out);
    h1::write_header("transfer-encoding", b"chunked", &mut out);
    if !keep_alive {
        h1::write_header("connection", b"close", &mut out);
    }
    out.extend_from_slice(b"\r\n");
    let (res, mut out) = net::write_all(client, out).await;
    if res.is_err() {
        return Persist::Close;
    }
    for (i, event) in events.iter().enumerate() {
        if control.reset_after == Some(i) {
            // Abrupt end: no last chunk; the connection closes when the handler returns.
            return Persist::Close;
        }
        if i > 0 {
            sleep(control.delay).await;
        }
        out.clear();
        encode_chunk(event, &mut out);
        let (res, back) = net::write_all(client, out).await;
        out = back;
        if res.is_err() {
            return Persist::Close;
        }
    }
    if control.reset_after == Some(events.len()) {
        return Persist::Close;
    }
    sleep(control.end_delay).await;
    out.clear();
    out.extend_from_slice(LAST_CHUNK);
    match net::write_all(client, out).await.0 {
        Ok(()) => Persist::KeepAlive,
        Err(_) => Persist::Close,
    }
}

impl MockHandler {
    /// The SSE events of a streamed answer, each ending in a blank line: a role chunk, `chunks`
    /// content chunks, a finish chunk, the usage-only chunk when `usage` is (prompt, completion)
    /// tokens, and `[DONE]`. With usage on, every earlier chunk carries `"usage":null`, as
    /// OpenAI sends it.
    fn stream_events(&self, chunks: usize, model: &str, usage: Option<(u64, u64)>) -> Vec<Vec<u8>> {
        let null_usage = if usage.is_some() {
            r#","usage":null"#
        } else {
            ""
        };
        let chunk = |choices: &str, tail: &str| -> Vec<u8> {
            format!(
                r#"data: {{"id":"{CHAT_ID}","object":"chat.completion.chunk","created":{CREATED},"model":{model},"system_fingerprint":"{FINGERPRINT}","choices":[{choices}]{tail}}}"#,
            )
            .into_bytes()
            .into_iter()
            .chain(*b"\n\n")
            .collect()
        };
        let mut events = Vec::with_capacity(chunks + 4);
        events.push(chunk(r#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}"#, null_usage));
        for i in 0..chunks {
            let content = format!(
                r#"{{"index":0,"delta":{{"content":"{}"}},"logprobs":null,"finish_reason":null}}"#,
                token(i)
            );
            events.push(chunk(&content, null_usage));
        }
        events.push(chunk(
            r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}"#,
            null_usage,
        ));
        if let Some((prompt, completion)) = usage {
            let total = prompt.saturating_add(completion);
            let usage = format!(
                r#","usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{total},"prompt_tokens_details":{{"cached_tokens":0}}}}"#
            );
            events.push(chunk("", &usage));
        }
        events.push(b"data: [DONE]\n\n".to_vec());
        events
    }

    /// A whole `chat.completion` answer from `model` (JSON-escaped), reporting `usage`.
    fn completion(&self, chunks: usize, model: &str, usage: (u64, u64)) -> Vec<u8> {
        let content: String = (0..chunks).map(token).collect();
        let (prompt_tokens, completion) = usage;
        let total = prompt_tokens.saturating_add(completion);
        format!(
            concat!(
                r#"{{"id":"{id}","object":"chat.completion","created":{created},"model":{model},"system_fingerprint":"{fp}","#,
                r#""choices":[{{"index":0,"message":{{"role":"assistant","content":{content},"refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"#,
                r#""usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{total},"#,
                r#""prompt_tokens_details":{{"cached_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0}}}}}}"#
            ),
            id = CHAT_ID,
            created = CREATED,
            model = model,
            fp = FINGERPRINT,
            content = Value::String(content),
            prompt = prompt_tokens,
            completion = completion,
            total = total,
        )
        .into_bytes()
    }

    fn models(&self) -> Vec<u8> {
        let model: Value = serde_json::from_str(&self.model).unwrap_or(Value::Null);
        json!({
            "object": "list",
            "data": [
                { "id": model, "object": "model", "created": CREATED, "owned_by": "aura-mock" },
                { "id": "text-embedding-3-small", "object": "model", "created": CREATED, "owned_by": "aura-mock" },
            ]
        })
        .to_string()
        .into_bytes()
    }
}

/// The content of chunk `i`.
fn token(i: usize) -> String {
    format!("tok{i} ")
}

/// Prompt tokens billed for a request body: a quarter of its bytes, at least 1.
fn prompt_tokens(body: &[u8]) -> u64 {
    (body.len() as u64 / 4).max(1)
}

fn embeddings(body: &[u8]) -> (StatusCode, Vec<u8>) {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return (
            StatusCode::BAD_REQUEST,
            openai_error("mock: request body is not JSON", "invalid_request_error"),
        );
    };
    let inputs = match request.get("input") {
        Some(Value::Array(items)) => items.len().max(1),
        _ => 1,
    };
    let model = request
        .get("model")
        .cloned()
        .unwrap_or_else(|| Value::from("text-embedding-3-small"));
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({ "object": "embedding", "index": i, "embedding": EMBEDDING }))
        .collect();
    let prompt = prompt_tokens(body);
    let answer = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": prompt, "total_tokens": prompt },
    });
    (StatusCode::OK, answer.to_string().into_bytes())
}

/// Images, as gpt-image answers them: `n` images (from a JSON body's `n`, else 1) and a usage
/// of input tokens (a quarter of the body's bytes, 40 of them image tokens) and 4160 output
/// tokens per image (one high-quality square image).
fn images(request: &Request) -> Vec<u8> {
    let n = serde_json::from_slice::<Value>(&request.body)
        .ok()
        .and_then(|v| v.get("n").and_then(Value::as_u64))
        .unwrap_or(1);
    let input = prompt_tokens(&request.body);
    let output = 4_160 * n;
    let data: Vec<Value> = (0..n).map(|_| json!({ "b64_json": "aW1hZ2U=" })).collect();
    json!({
        "created": CREATED,
        "data": data,
        "usage": {
            "input_tokens": input,
            "input_tokens_details": { "text_tokens": input.saturating_sub(40), "image_tokens": 40.min(input) },
            "output_tokens": output,
            "total_tokens": input + output,
        },
    })
    .to_string()
    .into_bytes()
}

/// A transcription: with `x-mock-seconds: N`, a usage by duration (whisper-1), else by tokens
/// (gpt-4o-transcribe: a quarter of the upload's bytes in, all of them audio, 20 out).
fn transcription(request: &Request) -> Vec<u8> {
    let seconds = request
        .head
        .headers
        .get("x-mock-seconds")
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let usage = match seconds {
        Some(seconds) => json!({ "type": "duration", "seconds": seconds }),
        None => {
            let input = prompt_tokens(&request.body);
            json!({ "type": "tokens", "input_tokens": input, "output_tokens": 20,
                    "total_tokens": input + 20,
                    "input_token_details": { "text_tokens": 0, "audio_tokens": input } })
        }
    };
    json!({ "text": "hello there", "usage": usage })
        .to_string()
        .into_bytes()
}

fn echo(request: &Request) -> Vec<u8> {
    json!({
        "method": request.head.method.as_str(),
        "target": request.head.target,
        "body": String::from_utf8_lossy(&request.body),
    })
    .to_string()
    .into_bytes()
}

/// The error body OpenAI sends for `status`.
fn error_body(status: StatusCode) -> Vec<u8> {
    let kind = if status == StatusCode::TOO_MANY_REQUESTS {
        "rate_limit_error"
    } else if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    openai_error("mock error", kind)
}

fn openai_error(message: &str, kind: &str) -> Vec<u8> {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": null } })
        .to_string()
        .into_bytes()
}

async fn sleep(delay: Duration) {
    if !delay.is_zero() {
        monoio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler() -> MockHandler {
        MockHandler::new(MockOptions::default(), Log::default())
    }

    fn events_text(events: &[Vec<u8>]) -> Vec<String> {
        events
            .iter()
            .map(|e| String::from_utf8(e.clone()).unwrap())
            .collect()
    }

    #[test]
    fn stream_without_usage_has_no_usage_fields() {
        let events = events_text(&handler().stream_events(3, &handler().model, None));
        assert_eq!(events.len(), 3 + 3);
        assert!(events
            .iter()
            .all(|e| e.starts_with("data: ") && e.ends_with("\n\n")));
        assert!(events.iter().all(|e| !e.contains("usage")), "{events:?}");
        assert!(events[0].contains(r#""delta":{"role":"assistant","content":""}"#));
        assert!(events[2].contains(r#""delta":{"content":"tok1 "}"#));
        assert!(events[4].contains(r#""finish_reason":"stop""#));
        assert_eq!(events[5], "data: [DONE]\n\n");
    }

    #[test]
    fn stream_with_usage_is_openai_shaped() {
        let events = events_text(&handler().stream_events(2, &handler().model, Some((7, 2))));
        assert_eq!(events.len(), 2 + 4);
        for e in &events[..4] {
            assert!(e.contains(r#""usage":null}"#), "{e}");
        }
        let usage: Value =
            serde_json::from_str(events[4].strip_prefix("data: ").unwrap().trim_end()).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["model"], "gpt-4o-mini-2024-07-18");
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens":7,"completion_tokens":2,"total_tokens":9,"prompt_tokens_details":{"cached_tokens":0}})
        );
        for e in &events[..4] {
            let v: Value =
                serde_json::from_str(e.strip_prefix("data: ").unwrap().trim_end()).unwrap();
            assert_eq!(v["object"], "chat.completion.chunk");
            assert!(v["usage"].is_null());
        }
    }

    #[test]
    fn whole_answer_is_json_with_usage() {
        let v: Value =
            serde_json::from_slice(&handler().completion(3, &handler().model, (10, 3))).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 tok2 ");
        assert_eq!(v["usage"]["prompt_tokens"], 10);
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert_eq!(v["usage"]["total_tokens"], 13);
    }

    #[test]
    fn prompt_tokens_are_a_quarter_of_the_body_at_least_one() {
        assert_eq!(prompt_tokens(b""), 1);
        assert_eq!(prompt_tokens(b"abc"), 1);
        assert_eq!(prompt_tokens(&[b'x'; 41]), 10);
    }

    #[test]
    fn error_types_follow_the_status() {
        let kind = |s: u16| {
            serde_json::from_slice::<Value>(&error_body(StatusCode::from_u16(s).unwrap())).unwrap()
                ["error"]["type"]
                .clone()
        };
        assert_eq!(kind(429), "rate_limit_error");
        assert_eq!(kind(500), "server_error");
        assert_eq!(kind(503), "server_error");
        assert_eq!(kind(400), "invalid_request_error");
    }
}
