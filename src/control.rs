//! The control plane, when `admin_listen` gives it its own address: `/metrics`, the admin API
//! and `/healthz` on one thread of their own (a monoio runtime on epoll: a scrape or an admin
//! listing is never a worker's work, and the exposition is merged and encoded here). The
//! data-plane port then answers neither `/metrics` nor `/admin`. Admin calls are logged
//! (method, path, status); scrapes are not.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Method, StatusCode};
use monoio::io::{AsyncReadRent, AsyncWriteRent};

use crate::admin::Admin;
use crate::budget::ledger::Ledger;
use crate::config::{Config, Limits, Period, Secret, Timeouts};
use crate::error::Error;
use crate::metrics::{self, Registry};
use crate::reload::Shared;
use crate::route;
use crate::server::{self, Handler, Persist, Reply, Request};

pub struct ControlPlane {
    pub registry: Arc<Registry>,
    /// A handle on the budget store for admin calls (a worker's, cloned).
    pub ledger: Ledger,
    /// The live configuration: its keys (aliases), and reloads.
    pub shared: Arc<Shared>,
    pub admin_token: Option<Secret>,
    pub period: Period,
    pub timeouts: Timeouts,
    /// The process is stopping: `/healthz` says so (503), so a balancer that checks this port
    /// stops sending traffic to the node.
    pub stopping: Arc<AtomicBool>,
}

impl ControlPlane {
    /// Serves on `listener` on a thread of its own, for the life of the process.
    pub fn start(
        self,
        listener: std::net::TcpListener,
        config: &Config,
    ) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let (limits, timeouts) = (config.limits, config.timeouts);
        std::thread::Builder::new()
            .name("aura-control".into())
            .spawn(move || {
                let runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .build();
                match runtime {
                    Ok(mut runtime) => runtime.block_on(serve(self, listener, limits, timeouts)),
                    Err(e) => tracing::error!(error = %e, "control plane: cannot build a runtime"),
                }
            })?;
        Ok(addr)
    }

    async fn answer<S: AsyncWriteRent>(
        &self,
        request: &Request,
        reply: Reply,
        client: &mut S,
    ) -> Result<Persist, Error> {
        let target = route::canonical(&request.head.target).map_err(Error::BadPath)?;
        let method = &request.head.method;
        let read_only = || match method {
            &Method::GET | &Method::HEAD => Ok(()),
            _ => Err(Error::MethodNotAllowed { allow: "GET, HEAD" }),
        };
        let within = self.timeouts.client_send;
        match target.path.as_str() {
            "/healthz" => {
                read_only()?;
                let (status, body) = if self.stopping.load(Ordering::Relaxed) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        &br#"{"status":"stopping"}"#[..],
                    )
                } else {
                    (StatusCode::OK, &br#"{"status":"ok"}"#[..])
                };
                Ok(server::write_json(client, status, body, reply, within).await)
            }
            "/metrics" => {
                read_only()?;
                let text = metrics::prom::render(&self.registry);
                let content_type = metrics::prom::CONTENT_TYPE;
                Ok(server::write_body(
                    client,
                    StatusCode::OK,
                    content_type,
                    text.as_bytes(),
                    reply,
                    within,
                )
                .await)
            }
            path if path == "/admin" || path.starts_with("/admin/") => {
                let token = self
                    .admin_token
                    .as_ref()
                    .ok_or_else(|| Error::NotFound(path.to_string()))?;
                let admin = Admin {
                    ledger: &self.ledger,
                    shared: &self.shared,
                    token,
                    period: self.period,
                };
                let answer = admin
                    .handle(
                        method,
                        path,
                        target.query.as_deref(),
                        &request.head.headers,
                        &request.body,
                    )
                    .await;
                // Every admin call is logged, refused ones too (a token being guessed shows).
                let status = answer.as_ref().map_or_else(|e| e.status(), |a| a.status);
                tracing::info!(target: "aura::access", route = "admin", method = %method, path, status = status.as_u16(), "control plane");
                Ok(server::write_answer(client, &answer?, reply, within).await)
            }
            path => Err(Error::NotFound(path.to_string())),
        }
    }
}

impl<S: AsyncReadRent + AsyncWriteRent> Handler<S> for ControlPlane {
    async fn handle(&self, request: Request, keep_alive: bool, client: &mut S) -> Persist {
        let reply = Reply {
            keep_alive,
            head_only: request.head.method == Method::HEAD,
        };
        match self.answer(&request, reply, client).await {
            Ok(persist) => persist,
            Err(error) => {
                let written = server::write_error(
                    client,
                    &error,
                    &error.body(),
                    &[],
                    reply,
                    self.timeouts.client_send,
                )
                .await;
                if written && keep_alive {
                    Persist::KeepAlive
                } else {
                    Persist::Close
                }
            }
        }
    }
}

async fn serve(
    control: ControlPlane,
    listener: std::net::TcpListener,
    limits: Limits,
    timeouts: Timeouts,
) {
    // The epoll driver waits for readiness: the socket must not block.
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| monoio::net::TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "control plane: cannot listen");
            return;
        }
    };
    let control = std::rc::Rc::new(control);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let control = control.clone();
                monoio::spawn(async move {
                    server::serve_connection(stream, control.as_ref(), limits, timeouts).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control plane: accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
