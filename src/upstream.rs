//! The way to the upstream: addresses resolved off the event loop, TCP (TCP_NODELAY before any
//! byte) or TLS via rustls, and a per-worker keep-alive pool. Knows nothing of usage or keys.
//!
//! DNS: `Resolver` resolves on its own thread (at start and every `REFRESH`) and publishes
//! the addresses as a swapped `Arc`; workers only read that snapshot when they open a
//! connection, never per request.

pub mod health;
pub mod keys;
mod records;
pub mod retry;
pub mod select;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::pki_types::ServerName;

use crate::config::upstreams::AzureSettings;
use crate::config::{Config, Scheme, Timeouts, UpstreamEntry, UpstreamKind, UpstreamUrl};
use crate::error::Error;
use health::Health;
use keys::KeyPool;
use records::RecordPacer;

/// How often the resolver thread looks the upstream host up again.
const REFRESH: Duration = Duration::from_secs(30);
/// Pooled connections idle longer than this are dropped rather than reused: many servers
/// close idle keep-alive connections after 60 s or less, and a stale one costs a retry.
const POOL_IDLE_LIMIT: Duration = Duration::from_secs(30);

type Addrs = Arc<RwLock<Arc<[SocketAddr]>>>;

/// Upstream addresses, refreshed by a background thread.
#[derive(Clone)]
pub struct Resolver {
    addrs: Addrs,
}

impl Resolver {
    /// Resolves once now (blocking: call before the workers start) and keeps refreshing.
    pub fn start(host: &str, port: u16) -> Resolver {
        let addrs: Addrs = Arc::new(RwLock::new(lookup(host, port).unwrap_or_else(|e| {
            tracing::warn!(host, error = %e, "upstream host did not resolve at start; retrying in the background");
            Arc::from(Vec::new())
        })));
        // The thread holds the addresses weakly: once every clone of this resolver is gone (a
        // reload took its upstream out), it ends at its next refresh.
        let shared = Arc::downgrade(&addrs);
        let host = host.to_string();
        let spawned = std::thread::Builder::new().name("aura-resolver".into()).spawn(move || loop {
            #[allow(clippy::disallowed_methods)] // the resolver's own thread, not a worker
            std::thread::sleep(REFRESH);
            let Some(shared) = shared.upgrade() else {
                break;
            };
            match lookup(&host, port) {
                Ok(fresh) if !fresh.is_empty() => {
                    if let Ok(mut slot) = shared.write() {
                        *slot = fresh;
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(host, error = %e, "upstream host did not resolve; keeping the last addresses"),
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the resolver thread; upstream addresses stay as resolved at start");
        }
        Resolver { addrs }
    }

    /// A fixed address (tests, the built-in demo upstream).
    pub fn fixed(addr: SocketAddr) -> Resolver {
        Resolver {
            addrs: Arc::new(RwLock::new(Arc::from(vec![addr]))),
        }
    }

    fn snapshot(&self) -> Arc<[SocketAddr]> {
        self.addrs
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

fn lookup(host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
    use std::net::ToSocketAddrs;
    #[allow(clippy::disallowed_methods)] // runs at start and on the resolver thread only
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    Ok(Arc::from(addrs))
}

/// rustls client config: the Mozilla root store plus the operator's CA files (the global
/// `upstream_ca_file`, and an upstream's own `ca_file`).
pub fn tls_config(ca_files: &[&Path]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in ca_files {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// Each route's TLS setup, in `routes` order: None for an http upstream; https upstreams
/// without a `ca_file` of their own share one.
pub fn tls_configs(
    config: &Config,
    routes: &[UpstreamEntry],
) -> Result<Vec<Option<Arc<rustls::ClientConfig>>>, String> {
    let global: Vec<&Path> = config
        .upstream_ca_file
        .iter()
        .map(|p| p.as_path())
        .collect();
    let mut shared = None;
    let mut out = Vec::with_capacity(routes.len());
    for route in routes {
        let tls = match (&route.url.scheme, &route.ca_file) {
            (Scheme::Http, _) => None,
            (Scheme::Https, Some(own)) => {
                let mut files = global.clone();
                files.push(own);
                Some(tls_config(&files).map_err(|e| format!("upstream `{}`: {e}", route.name))?)
            }
            (Scheme::Https, None) => match &shared {
                Some(tls) => Some(Arc::clone(tls)),
                None => {
                    let tls = tls_config(&global)?;
                    shared = Some(Arc::clone(&tls));
                    Some(tls)
                }
            },
        };
        out.push(tls);
    }
    Ok(out)
}

/// One upstream connection, plain or TLS (with its socket's descriptor and what its record
/// pacer holds, for the pool's check).
pub enum Conn {
    Plain(TcpStream),
    Tls(
        Box<monoio_rustls::ClientTlsStream<RecordPacer>>,
        RawFd,
        Rc<Cell<usize>>,
    ),
}

impl Conn {
    fn fd(&self) -> RawFd {
        match self {
            Conn::Plain(s) => s.as_raw_fd(),
            Conn::Tls(_, fd, _) => *fd,
        }
    }

    /// Nothing arrived that its last answer did not use: not above the socket (bytes of a later
    /// TLS record its pacer holds), not in it.
    fn quiet(&self) -> bool {
        match self {
            Conn::Plain(_) => quiet(self.fd()),
            Conn::Tls(_, fd, held) => held.get() == 0 && quiet(*fd),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(..))
    }
}

/// Whether an idle connection is quiet: no bytes and no close arrived while it sat in the pool.
/// Bytes that came unasked (a late body, an idle `408`) belong to no request: on a reused
/// connection they would be read as the next request's answer, another client's.
fn quiet(fd: RawFd) -> bool {
    // SAFETY: `fd` is the socket of a `Conn` the caller holds, so it stays open for this call;
    // the borrow does not outlive it.
    #[allow(unsafe_code)]
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(&socket)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        // 0: the upstream closed it; more: bytes nobody asked for.
        Ok(_) => false,
    }
}

impl AsyncReadRent for Conn {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s, ..) => s.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.readv(buf).await,
            Conn::Tls(s, ..) => s.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for Conn {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.write(buf).await,
            Conn::Tls(s, ..) => s.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.writev(buf).await,
            Conn::Tls(s, ..) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush().await,
            Conn::Tls(s, ..) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s, ..) => s.shutdown().await,
        }
    }
}

/// A worker's way to one upstream: its own pool, keys and health, no locks on the request
/// path; and what its `[[upstreams]]` entry sets (or the global settings where it is silent).
pub struct Upstream {
    /// Its name in `[[upstreams]]` (`default` for `upstream_url`): the access log's `upstream`.
    pub name: String,
    pub url: UpstreamUrl,
    pub kind: UpstreamKind,
    /// The `Host` header value, computed once rather than per request.
    pub authority: String,
    pub timeouts: Timeouts,
    pub inject_stream_usage: bool,
    /// Its own provider keys (empty: the request's credential goes on).
    pub keys: KeyPool,
    pub health: Health,
    /// Its `headers`, as `name: value\r\n` lines, and their names (a client's header of the
    /// same name is not forwarded).
    extra_headers: Vec<u8>,
    extra_names: Vec<String>,
    pub azure: Option<AzureSettings>,
    resolver: Resolver,
    tls: Option<(monoio_rustls::TlsConnector, ServerName<'static>)>,
    max_idle: usize,
    idle: RefCell<Vec<(Conn, Instant)>>,
}

impl Upstream {
    /// The upstream of `route` (one of `config.routes()`), with the pool size and the settings
    /// `config` sets for every upstream where the route sets none.
    pub fn new(
        route: &UpstreamEntry,
        config: &Config,
        resolver: Resolver,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Upstream, String> {
        let url = route.url.clone();
        let tls = match (&url.scheme, tls) {
            (Scheme::Https, Some(tls)) => {
                let name = ServerName::try_from(url.host.clone())
                    .map_err(|e| format!("upstream host `{}`: {e}", url.host))?;
                Some((monoio_rustls::TlsConnector::from(tls), name))
            }
            (Scheme::Https, None) => return Err("https upstream without a TLS config".into()),
            (Scheme::Http, _) => None,
        };
        let mut timeouts = config.timeouts;
        let own = route.timeouts;
        timeouts.upstream_connect = own.connect.unwrap_or(timeouts.upstream_connect);
        timeouts.upstream_first_byte = own.first_byte.unwrap_or(timeouts.upstream_first_byte);
        timeouts.upstream_read = own.read.unwrap_or(timeouts.upstream_read);
        let mut extra_headers = Vec::new();
        for (name, value) in &route.headers {
            crate::http::write_header(name, value.expose().as_bytes(), &mut extra_headers);
        }
        Ok(Upstream {
            name: route.name.clone(),
            authority: url.authority(),
            url,
            kind: route.kind,
            timeouts,
            inject_stream_usage: route
                .inject_stream_usage
                .unwrap_or(config.inject_stream_usage),
            keys: KeyPool::new(route.kind, &route.keys),
            health: Health::default(),
            extra_headers,
            extra_names: route.headers.iter().map(|(n, _)| n.clone()).collect(),
            azure: route.azure.clone(),
            resolver,
            tls,
            max_idle: config.upstream_pool_max_idle,
            idle: RefCell::new(Vec::new()),
        })
    }

    /// Its `headers` as head lines, to append to a request head.
    pub fn extra_headers(&self) -> &[u8] {
        &self.extra_headers
    }

    /// Whether its `headers` set `name` (lower case): the client's is then not forwarded.
    pub fn sets_header(&self, name: &str) -> bool {
        !self.extra_names.is_empty() && self.extra_names.iter().any(|n| n == name)
    }

    /// Whether a request may go to it now: not ejected, no trial out, and a key of its pool
    /// available.
    pub fn available(&self, now: Instant) -> bool {
        self.health.available(now) && self.keys.any_available(now)
    }

    /// Whether it is up, as `aura_upstream_up` says: not ejected, and not every key resting.
    pub fn up(&self, now: Instant) -> bool {
        !self.health.resting(now) && self.keys.any_up(now)
    }

    /// The most recently returned connection that is still quiet (nothing arrived on it and it
    /// was not closed while idle), if any; the others are closed.
    pub fn pooled(&self) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < POOL_IDLE_LIMIT && conn.quiet() {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection whose last response ended exactly at its framing's end, with
    /// nothing read past it.
    pub fn put_back(&self, conn: Conn) {
        if let Conn::Tls(_, _, held) = &conn {
            if held.get() > 0 {
                // A later record came with the answer's last one.
                return;
            }
        }
        let mut idle = self.idle.borrow_mut();
        if idle.len() < self.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    /// Opens a fresh connection, trying each resolved address within `limit` (the connect
    /// timeout, or less where the request's deadline is nearer).
    pub async fn connect_within(&self, limit: Duration) -> Result<Conn, Error> {
        match monoio::time::timeout(limit, self.connect_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(Error::UpstreamTimeout),
        }
    }

    async fn connect_unbounded(&self) -> Result<Conn, Error> {
        let addrs = self.resolver.snapshot();
        let mut last = format!("{} did not resolve", self.url.host);
        for addr in addrs.iter() {
            let tcp = match TcpStream::connect(*addr).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            // Before the TLS handshake too: Nagle + delayed ACK cost ~40 ms per handshake.
            let _ = tcp.set_nodelay(true);
            let fd = tcp.as_raw_fd();
            return match &self.tls {
                None => Ok(Conn::Plain(tcp)),
                Some((connector, name)) => {
                    let (paced, held) = RecordPacer::new(tcp);
                    match connector.connect(name.clone(), paced).await {
                        Ok(tls) => Ok(Conn::Tls(Box::new(tls), fd, held)),
                        Err(e) => Err(Error::UpstreamUnreachable(format!(
                            "TLS with {}: {e}",
                            self.url.host
                        ))),
                    }
                }
            };
        }
        Err(Error::UpstreamUnreachable(last))
    }
}
