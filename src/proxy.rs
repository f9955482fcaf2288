//! THE request phase sequence, and the only place that knows it:
//! route → authorize and admit (billable routes: the bearer key's id reserves the request's
//! upper cost estimate in this worker's budget shard, or 402) → rewrite (chat completions) →
//! forward (pooled upstream; sent again only if it provably never left) → relay (proxy/relay.rs) →
//! settle (the reservation becomes the real cost, metrics, one access-log record).
//! API keys never reach a log line, a metric or the store: only their id does.

pub mod billing;
mod outbound;
mod rates;
pub use outbound::deployment_name;
pub mod relay;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, Method, StatusCode};
use monoio::io::{AsyncReadRent, AsyncWriteRent};

use crate::admin::Admin;
use crate::auth::{self, Directory, KeyId};
use crate::budget::estimate::{self, Basis, Billable};
use crate::budget::{self, Refusal};
use crate::buffers::BufPool;
use crate::config::upstreams::Api;
use crate::config::{Config, KeyMode, Limits, Period, Secret, Timeouts};
use crate::error::Error;
use crate::governance::Governance;
use crate::http::{self as h1, ResponseHead};
use crate::metrics::{self, Registry};
use crate::net::{self, Timed};
use crate::pricing::{self, Match, Price, PriceTable};
use crate::reload::{KeySet, Live, Shared};
use crate::rewrite;
use crate::route::{self, Billing};
use crate::server::{self, Handler, Persist, Request};
use crate::spend_record::{self, Recorder};
use crate::upstream::health::HealthRules;
use crate::upstream::retry::{self, retryable_status, AttemptOutcome};
use crate::upstream::select::{ModelPattern, ModelTable, Picker};
use crate::upstream::{Conn, Upstream};
use crate::usage::Usage;
use billing::Bill;
use outbound::Credential;
use rates::{RateHeaders, Rates};
use relay::{BodyKind, Drains, Relay, RelayEnd};
use std::rc::Rc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
    /// `GET /v1/usage`: the caller's own budget.
    Usage,
    /// `/admin/keys…`: the admin API (admin.rs).
    Admin,
    ChatCompletions,
    /// `POST /v1/messages`: Anthropic's Messages API (on `anthropic` upstreams).
    Messages,
    /// Any other `/v1` route, and how it is billed (route.rs).
    Api(Billing),
    NotFound,
    /// Refused before routing: the request head or body could not be read, or its path could
    /// not be made canonical.
    Unparsed,
}

impl Route {
    /// The route of `method` on a canonical path (route.rs).
    pub fn of(method: &Method, path: &str) -> Route {
        match path {
            // Aura's own: they answer GET and HEAD (405 otherwise, in `handle`).
            "/healthz" => Route::Health,
            "/metrics" => Route::Metrics,
            "/v1/usage" => Route::Usage,
            _ if path == "/admin" || path.starts_with("/admin/") => Route::Admin,
            _ if path.starts_with("/v1/") => match route::billing(method, path) {
                Billing::Chat => Route::ChatCompletions,
                Billing::Messages => Route::Messages,
                billing => Route::Api(billing),
            },
            _ => Route::NotFound,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Route::Health => "healthz",
            Route::Metrics => "metrics",
            Route::Usage => "usage",
            Route::Admin => "admin",
            Route::ChatCompletions => "chat_completions",
            Route::Messages => "messages",
            Route::Api(_) => "passthrough",
            Route::NotFound => "not_found",
            Route::Unparsed => "unparsed",
        }
    }
}

/// A worker's upstreams (each with its own pool), which models each serves, and the worker's
/// own count of requests in flight on each.
pub struct Routing {
    pub upstreams: Vec<Upstream>,
    pub models: ModelTable,
    pub picker: Picker,
    /// With `[[upstreams]]`: the answer to `GET /v1/models`, made once from the config.
    pub listing: Option<Vec<u8>>,
    /// Upstreams a request may try (1: no retries).
    pub max_attempts: u32,
    /// Arrival → response head, all attempts together.
    pub total_timeout: Option<Duration>,
    pub health: HealthRules,
}

impl Routing {
    /// `GET /v1/models` in OpenAI's shape: every model `[[upstreams]]` names exactly (a glob
    /// names none), each once, owned by the first upstream with a weight that serves it.
    pub fn listing(routes: &[crate::config::UpstreamEntry]) -> Vec<u8> {
        let mut seen = std::collections::BTreeMap::new();
        for route in routes.iter().filter(|r| r.weight > 0) {
            for model in route.models.iter().filter_map(|m| m.exact()) {
                seen.entry(model.to_string())
                    .or_insert_with(|| route.name.clone());
            }
        }
        let data: Vec<serde_json::Value> = seen
            .into_iter()
            .map(|(id, owner)| {
                serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
            })
            .collect();
        serde_json::json!({"object": "list", "data": data})
            .to_string()
            .into_bytes()
    }

    /// The upstreams a request asking for `model` may go to: those serving it; without a model
    /// (a file, a listing), the first upstream with a weight alone.
    /// As a set: a bit per upstream (there are at most 64), no allocation.
    fn candidates(&self, model: Option<&str>, api: Api) -> u64 {
        let speaks = |i: usize| self.upstreams[i].kind.api() == api;
        let n = self.upstreams.len().min(64);
        match model {
            Some(model) => (0..n)
                .filter(|&i| speaks(i) && self.models.serves_at(i, model))
                .fold(0, |set, i| set | 1 << i),
            None => (0..n)
                .find(|&i| speaks(i) && self.models.weight(i) > 0)
                .map_or(0, |i| 1 << i),
        }
    }

    /// Whether an `anthropic` upstream is configured: `/v1/messages` is then Aura's Messages
    /// route (billed, on those upstreams); without one it is forwarded as before (unpriced).
    pub fn speaks_anthropic(&self) -> bool {
        self.upstreams
            .iter()
            .any(|u| u.kind.api() == Api::Anthropic)
    }

    /// The next upstream for a request asking for `model`, none of `tried` (a bit per
    /// upstream): among those available now (not ejected, a pool key not resting), by weight
    /// and load; when none is, among all of them, as Envoy's panic threshold does: a try
    /// beats a certain failure.
    pub fn next(
        &self,
        model: Option<&str>,
        api: Api,
        tried: &Tried,
        now: Instant,
    ) -> Option<usize> {
        self.next_up(model, api, tried, now).or_else(|| {
            let untried = self.candidates(model, api) & !tried.upstreams;
            self.picker.pick_set(&self.models, untried)
        })
    }

    /// The next upstream for `model` among those up now only: none when every untried one is
    /// down (a fallback model's may be up).
    pub fn next_up(
        &self,
        model: Option<&str>,
        api: Api,
        tried: &Tried,
        now: Instant,
    ) -> Option<usize> {
        // Not tried yet. (A client's own key may go to any upstream serving its model, on a
        // retry as on a first attempt: in passthrough mode that is the config's choice, and
        // Aura warns of it at start.)
        let untried = self.candidates(model, api) & !tried.upstreams;
        let available = bits(untried)
            .filter(|&i| self.upstreams[i].available(now))
            .fold(0, |set, i| set | 1 << i);
        self.picker.pick_set(&self.models, available)
    }

    /// Whether an upstream serving `model` is left untried.
    fn has_next(&self, model: Option<&str>, api: Api, tried: &Tried) -> bool {
        self.candidates(model, api) & !tried.upstreams != 0
    }

    /// Health after upstream `chosen` answered with `head`, its pool key `key` in hand, and
    /// what the answer means for the request:
    /// - a pool key answered 401 or 403 rests; one answered 429 rests for its `Retry-After`
    ///   (the upstream's health is not the key's);
    /// - a 429 on the client's own credential says nothing of the upstream: no health change;
    /// - 503 and 529 (overloaded) and 500, 502, 504 (failing) count against the upstream, and
    ///   a `Retry-After` rests it;
    /// - any other answer is a success.
    pub fn judge_answer(
        &self,
        chosen: usize,
        key: Option<usize>,
        head: &ResponseHead,
        now: Instant,
    ) -> Judgement {
        let upstream = &self.upstreams[chosen];
        let pooled = key.and_then(|k| upstream.keys.get(k));
        let status = head.status.as_u16();
        // Read only where it is heeded: a success's headers are not searched.
        let wait = match status {
            429 | 503 | 529 => retry::retry_after(&head.headers),
            _ => None,
        };
        let key_rules = self.health.for_keys();
        match (status, pooled) {
            (401 | 403, Some(pooled)) => {
                if let Some(rest) = pooled.health.failed(&key_rules, now) {
                    tracing::warn!(upstream = %upstream.name, status, rest_ms = rest.as_millis() as u64, "the provider refused a pool key: resting it");
                }
                Judgement::KeyRefused
            }
            (429, Some(pooled)) => {
                match wait {
                    Some(wait) => pooled.health.rest_for(&key_rules, wait, now),
                    None => {
                        pooled.health.failed(&key_rules, now);
                    }
                }
                Judgement::KeyRefused
            }
            (429, None) => Judgement::NotTaken,
            (s, _) if retryable_status(s) => {
                if let Some(ejected) = upstream.health.failed(&self.health, now) {
                    tracing::warn!(upstream = %upstream.name, status = s, rest_ms = ejected.as_millis() as u64, "upstream ejected");
                }
                if let Some(wait) = wait {
                    upstream.health.rest_for(&self.health, wait, now);
                }
                if matches!(s, 503 | 529) {
                    Judgement::NotTaken
                } else {
                    Judgement::Failed
                }
            }
            _ => {
                upstream.health.succeeded();
                if let Some(pooled) = pooled {
                    pooled.health.succeeded();
                }
                Judgement::Answer
            }
        }
    }

    /// Health after upstream `chosen` failed before a response head.
    fn judge_failure(&self, chosen: usize, now: Instant) {
        let upstream = &self.upstreams[chosen];
        if let Some(ejected) = upstream.health.failed(&self.health, now) {
            tracing::warn!(upstream = %upstream.name, rest_ms = ejected.as_millis() as u64, "upstream ejected");
        }
    }

    /// The upstreams a key may go to (a bit each): the one it is pinned to, else all.
    fn allowed(&self, pinned: Option<&str>) -> u64 {
        match pinned {
            None => u64::MAX,
            Some(name) => self
                .upstreams
                .iter()
                .take(64)
                .position(|u| u.name == name)
                .map_or(0, |i| 1 << i),
        }
    }

    /// Whether some upstream among `allowed` serves `model`: checked before a request
    /// reserves anything, so a model nobody serves is a 404 whatever the key's budget or the
    /// store's state.
    fn check(&self, model: Option<&str>, api: Api, allowed: u64) -> Result<(), Error> {
        let Some(model) = model else {
            return Ok(());
        };
        let served = (0..self.upstreams.len().min(64)).any(|i| {
            allowed & (1 << i) != 0
                && self.upstreams[i].kind.api() == api
                && self.models.serves_at(i, model)
        });
        if served {
            Ok(())
        } else {
            Err(Error::model_not_found(model))
        }
    }
}

/// What a reload replaces, as one worker holds it: its routing table (with its own pools,
/// health and picker), the keys, the prices, and what it learnt of answers' prices. A request
/// keeps the view it started with to its end (reload.rs).
pub struct View {
    /// Shared by the views a worker builds when only the keys change.
    pub routing: Rc<Routing>,
    /// `[fallbacks]`: model → the models its requests go on to.
    pub fallbacks: HashMap<String, Vec<String>>,
    pub directory: Arc<Directory>,
    pub governance: Arc<Governance>,
    pub prices: Arc<PriceTable>,
    /// Per model asked for, the price answers to it came at when more than it reserved at.
    answered_as: Rc<std::cell::RefCell<HashMap<String, Price>>>,
}

impl View {
    /// Worker `worker`'s view of `live` and `keys`: its own pools, health and picker.
    pub fn build(live: &Live, keys: &KeySet, worker: usize) -> Result<View, String> {
        let config = &live.config;
        let upstreams = live
            .routes
            .iter()
            .zip(&live.resolvers)
            .zip(&live.tls)
            .map(|((route, resolver), tls)| {
                Upstream::new(route, config, resolver.clone(), tls.clone())
            })
            .collect::<Result<Vec<Upstream>, String>>()?;
        let mut models = ModelTable::default();
        for route in &live.routes {
            models.push(route.models.clone(), route.weight);
        }
        let routing = Routing {
            upstreams,
            models,
            picker: Picker::new(live.routes.len(), worker as u64),
            listing: (!config.upstreams.is_empty()).then(|| Routing::listing(&live.routes)),
            max_attempts: config.max_attempts,
            total_timeout: config.upstream_total_timeout,
            health: config.health,
        };
        Ok(View {
            routing: Rc::new(routing),
            fallbacks: config.fallbacks.iter().cloned().collect(),
            directory: keys.directory.clone(),
            governance: keys.governance.clone(),
            prices: live.prices.clone(),
            answered_as: Rc::default(),
        })
    }

    /// This view with other keys: the same routing (pools, health), prices and learnt prices.
    fn with_keys(&self, keys: &KeySet) -> View {
        View {
            routing: self.routing.clone(),
            fallbacks: self.fallbacks.clone(),
            directory: keys.directory.clone(),
            governance: keys.governance.clone(),
            prices: self.prices.clone(),
            answered_as: self.answered_as.clone(),
        }
    }
}

/// A request as it goes upstream: for a streamed chat completion, with its body that asks for
/// the usage event too (`stream_options.include_usage`), for upstreams that take it.
struct Outgoing {
    request: Request,
    with_usage: Option<Vec<u8>>,
    client_asked_usage: bool,
}

impl Outgoing {
    fn as_is(request: Request) -> Outgoing {
        Outgoing {
            request,
            with_usage: None,
            client_asked_usage: false,
        }
    }
}

/// One worker's proxy: its upstream pools and settings. `!Send`, like everything per worker.
pub struct Proxy {
    /// The live configuration, and this worker's view of it (rebuilt when a reload changed
    /// the generation it was built from).
    shared: Arc<Shared>,
    view: std::cell::RefCell<Rc<View>>,
    view_generation: Cell<u64>,
    /// The keys generation it was built (or last rebuilt) from.
    keys_generation: Cell<u64>,
    worker: usize,
    limits: Limits,
    timeouts: Timeouts,
    buffers: BufPool,
    metrics: metrics::Shard,
    registry: Arc<Registry>,
    budget: budget::Shard,
    /// Where each settled request goes as one line (`spend_record`).
    recorder: Option<Recorder>,
    /// Requests this worker settled: with the worker's prefix, a request's id.
    requests: Cell<u64>,
    request_prefix: String,
    default_max_output_tokens: u64,
    /// Budget periods, as the admin API shows them.
    period: Period,
    /// Forward routes Aura cannot price for virtual keys too.
    allow_unpriced: bool,
    /// The most tokens a usage may report (beyond: not believed).
    max_usage_tokens: u64,
    admin_token: Option<Secret>,
    drains: Drains,
    /// Requests being handled (drains included): shutdown waits for them.
    in_flight: Cell<usize>,
    /// Shutdown has begun: answers close their connections.
    stopping: Cell<bool>,
    /// /metrics and the admin API are served on their own listener (`admin_listen`).
    control_elsewhere: bool,
}

/// Models whose answer price a worker remembers (bounded: model names come from clients).
const MAX_LEARNED_MODELS: usize = 256;

/// What a request reserves, and what its bill needs.
struct Admission {
    estimate: u64,
    /// Prompt and completion tokens it may use at most (for tokens-per-minute limits).
    tokens: u64,
    /// The model asked for.
    model: Option<String>,
    choices: u64,
    /// The price it reserves at.
    price: Price,
    /// What a successful answer costs whatever it says (text to speech).
    fixed: Option<u64>,
}

/// Everything settle needs to know about one request. `'p` is the proxy's: a reservation
/// borrows its worker's budget shard.
struct Outcome<'p> {
    /// The configuration it follows to its end.
    view: &'p View,
    route: Route,
    status: Option<StatusCode>,
    model: Option<String>,
    stream: bool,
    usage: Option<Usage>,
    /// Received the request → wrote the upstream request.
    to_upstream: Option<Duration>,
    /// Upstream's first body byte read → written to the client (the overhead Aura adds).
    ttft_overhead: Option<Duration>,
    /// Received the request → first body byte written to the client.
    ttft: Option<Duration>,
    error: Option<Error>,
    /// The caller's key id, once authorized.
    key: Option<KeyId>,
    /// The models the caller's key may ask for (empty: any), and the upstream it is pinned to.
    models_allowed: &'p [ModelPattern],
    pinned: Option<&'p str>,
    /// A billable request's reservation, until it is billed.
    bill: Option<Bill<'p>>,
    /// What billing charged (set once, before the response's last bytes reach the client).
    charge: Option<Charge<'p>>,
    /// A virtual key's upstream key: sent instead of the client's.
    upstream_key: Option<Secret>,
    /// De-framed response body bytes relayed.
    response_bytes: u64,
    /// The client left and the response was not read to its end.
    abandoned: bool,
    /// A HEAD request: what Aura answers itself has no body.
    head_only: bool,
    /// The upstream it went to (its last attempt's), by name.
    upstream: Option<&'p str>,
    /// The upstream whose answer went to the client (none: Aura answered itself).
    answered_by: Option<&'p str>,
    /// Upstreams tried.
    attempts: u32,
    /// The API it speaks: its upstreams, and the shape of Aura's own errors to it.
    api: Api,
    /// The current attempt wrote (some of) the request to its upstream.
    attempt_sent: bool,
    /// The current attempt was cut by the deadline of all attempts, not its own timeout.
    deadline_cut: bool,
    /// Reservations of attempts given up on after they reached their upstream, charged.
    given_up_nano: u64,
    /// The model the client asked for, once billed (`model` is the answer's).
    requested: Option<String>,
    /// A rate-limited key's `x-ratelimit-*` headers, for its answer.
    rate_headers: Option<RateHeaders>,
}

impl<'p> Outcome<'p> {
    fn new(route: Route, view: &'p View) -> Outcome<'p> {
        Outcome {
            view,
            route,
            status: None,
            model: None,
            stream: false,
            usage: None,
            to_upstream: None,
            ttft_overhead: None,
            ttft: None,
            error: None,
            key: None,
            models_allowed: &[],
            pinned: None,
            bill: None,
            charge: None,
            upstream_key: None,
            response_bytes: 0,
            abandoned: false,
            head_only: false,
            upstream: None,
            answered_by: None,
            attempts: 0,
            api: Api::OpenAi,
            attempt_sent: false,
            deadline_cut: false,
            given_up_nano: 0,
            requested: None,
            rate_headers: None,
        }
    }

    /// How an answer Aura writes itself goes out on this request's connection.
    /// Whether the caller's key may ask for `model`.
    fn may_use(&self, model: &str) -> bool {
        self.models_allowed.is_empty() || self.models_allowed.iter().any(|m| m.matches(model))
    }

    fn reply(&self, keep_alive: bool) -> server::Reply {
        server::Reply {
            keep_alive,
            head_only: self.head_only,
        }
    }
}

impl Proxy {
    /// Worker `worker`'s proxy, following `shared`'s live configuration.
    pub fn new(
        shared: Arc<Shared>,
        worker: usize,
        config: &Config,
        registry: Arc<Registry>,
        budget: budget::Shard,
    ) -> Result<Proxy, String> {
        let generation = shared.generation();
        let keys_generation = shared.keys_generation();
        let view = View::build(&shared.live(), &shared.keys(), worker)?;
        Ok(Proxy {
            shared,
            view: std::cell::RefCell::new(Rc::new(view)),
            view_generation: Cell::new(generation),
            keys_generation: Cell::new(keys_generation),
            worker,
            limits: config.limits,
            timeouts: config.timeouts,
            buffers: BufPool::default(),
            metrics: metrics::Shard::default(),
            registry,
            budget,
            recorder: None,
            requests: Cell::new(0),
            request_prefix: request_prefix(worker),
            default_max_output_tokens: config.budgets.default_max_output_tokens,
            period: config.budgets.period,
            allow_unpriced: config.budgets.allow_unpriced_routes,
            max_usage_tokens: config.budgets.max_usage_tokens,
            admin_token: config.budgets.admin_token.clone(),
            drains: Drains::new(config.budgets.max_drains_per_worker),
            in_flight: Cell::new(0),
            stopping: Cell::new(false),
            control_elsewhere: config.admin_listen.is_some(),
        })
    }

    /// This worker's view of the live configuration: rebuilt first when a reload changed it
    /// (one atomic read per request otherwise). A view that cannot be built (checked whole
    /// before the reload was applied, so never expected) leaves the old one in use.
    fn view(&self) -> Rc<View> {
        let generation = self.shared.generation();
        let keys_generation = self.shared.keys_generation();
        if generation == self.view_generation.get() && keys_generation != self.keys_generation.get()
        {
            // Only the keys changed: the same routing, pools and health.
            let seen = self.keys_generation.replace(keys_generation);
            let view = self.view.borrow().with_keys(&self.shared.keys());
            *self.view.borrow_mut() = Rc::new(view);
            if self.shared.tightened_at() > seen {
                // A budget shrank: leases granted under the old one go back now.
                self.budget.surrender(Instant::now());
            }
        }
        if generation != self.view_generation.get() {
            self.view_generation.set(generation);
            self.keys_generation.set(keys_generation);
            match View::build(&self.shared.live(), &self.shared.keys(), self.worker) {
                Ok(view) => {
                    *self.view.borrow_mut() = Rc::new(view);
                    // Limits may have changed: leases granted under the old ones go back.
                    self.budget.surrender(Instant::now());
                }
                Err(e) => {
                    tracing::error!(worker = self.worker, error = %e, "reload: this worker keeps its old configuration")
                }
            }
        }
        self.view.borrow().clone()
    }

    /// The live configuration (for the admin API's reload).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Who the caller is; a virtual key's upstream key is kept for the upstream request.
    fn authorize<'p>(&self, request: &Request, outcome: &mut Outcome<'p>) -> Result<KeyId, Error> {
        let view: &'p View = outcome.view;
        let caller = view
            .directory
            .authorize(&request.head.headers, self.budget.unix_now())?;
        outcome.key = Some(caller.id);
        outcome.upstream_key = caller.upstream_key.cloned();
        outcome.models_allowed = caller.models;
        outcome.pinned = caller.upstream;
        Ok(caller.id)
    }

    /// Hands this worker's settled spend to the store and returns idle leases (every flush
    /// interval, off the request path).
    pub fn flush_budget(&self) {
        self.budget.flush(Instant::now());
    }

    /// Reads the clock for the budget (between flushes).
    pub fn tick_budget(&self) {
        self.budget.tick();
    }

    /// An answer from the ledger thread (the Valkey store) for this worker's shard.
    pub fn ledger_reply(&self, reply: crate::budget::ledger::Reply) {
        self.budget.on_reply(reply);
    }

    /// At shutdown, with no request in flight: hands over all spend and returns every lease.
    pub fn close_budget(&self) {
        self.budget.close(Instant::now());
    }

    /// From now on every answer closes its connection.
    pub fn stop_keeping_alive(&self) {
        self.stopping.set(true);
    }

    /// Records every settled request to `recorder`.
    pub fn recording(mut self, recorder: Option<Recorder>) -> Proxy {
        self.recorder = recorder;
        self
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Frees the pooled buffers a whole interval did not need (after a burst).
    pub fn trim_buffers(&self) {
        self.buffers.trim();
    }

    /// Authorize and admit: the caller's key id reserves the upper estimate of the request's
    /// cost, which settle turns into the real cost.
    async fn admit<'p>(
        &'p self,
        request: &Request,
        admission: Admission,
        outcome: &mut Outcome<'p>,
    ) -> Result<(), Error> {
        let key = self.authorize(request, outcome)?;
        let view = outcome.view;
        if let Some(model) = admission.model.as_deref() {
            if !outcome.may_use(model) {
                return Err(Error::ModelNotAllowed(model.chars().take(200).collect()));
            }
        }
        let allowed = view.routing.allowed(outcome.pinned);
        view.routing
            .check(admission.model.as_deref(), outcome.api, allowed)?;
        let charges = view.governance.charges(key);
        let admitted =
            Rates::admit(&self.budget, &view.governance, &charges, admission.tokens).await;
        if charges.rate_limited() {
            // Refused or not, the answer tells where the key stands.
            outcome.rate_headers = Some(RateHeaders::of(&self.budget, &view.governance, &charges));
        }
        let rates = admitted?;
        let reservation = self
            .budget
            .reserve_all(charges.money(), admission.estimate)
            .await
            .map_err(|refusal| refusal_error(refusal, &view.governance))?;
        outcome.bill = Some(Bill {
            reservation,
            rates,
            tokens: admission.tokens,
            request_bytes: request.body.len() as u64,
            choices: admission.choices,
            requested: admission.model,
            reserved_at: admission.price,
            fixed: admission.fixed,
        });
        Ok(())
    }

    /// What a request billed by its usage reserves: every body byte a prompt token, each
    /// choice up to `max_tokens` (else the model's output limit).
    fn usage_admission(
        &self,
        view: &View,
        request: &Request,
        kind: Billable,
        model: Option<&str>,
        max_tokens: Option<u64>,
        choices: u64,
    ) -> Admission {
        // Only a generation may fall back to another model.
        let falls_back = kind == Billable::Generates;
        let price = self.reserving(view, model.unwrap_or(""), falls_back);
        let upper = estimate::upper_estimate(
            &price,
            kind,
            request.body.len(),
            max_tokens,
            choices,
            self.default_max_output_tokens,
        );
        Admission {
            estimate: upper.nano,
            tokens: upper.tokens,
            model: model.map(str::to_owned),
            choices,
            price,
            fixed: None,
        }
    }

    /// What an images, speech or transcription request reserves; none when Aura cannot price
    /// it (text to speech by a model without a price per character).
    fn media_admission(
        &self,
        view: &View,
        billing: Billing,
        request: &Request,
    ) -> Option<Admission> {
        let content_type = request
            .head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let bounds = billing::media_bounds(content_type, &request.body);
        let price = self.reserving(view, bounds.model.as_deref().unwrap_or(""), false);
        let bytes = request.body.len();
        let (estimate, fixed) = match billing {
            Billing::Images => (
                estimate::images_estimate(&price, bytes, bounds.images),
                None,
            ),
            Billing::Speech => {
                let cost = estimate::speech_cost(&price, bounds.characters)?;
                (cost, Some(cost))
            }
            Billing::Transcription => (
                estimate::transcription_estimate(&price, bytes, self.default_max_output_tokens),
                None,
            ),
            Billing::Chat
            | Billing::Messages
            | Billing::Usage(_)
            | Billing::Free
            | Billing::Unpriced => return None,
        };
        // Images bill their output in tokens; audio's prompt is its bytes (a bound, the
        // reservation settles to the usage reported).
        let completion = match billing {
            Billing::Images => estimate::IMAGE_OUTPUT_TOKENS.saturating_mul(bounds.images.max(1)),
            _ => 0,
        };
        Some(Admission {
            estimate,
            tokens: estimate::rate_tokens(bytes, completion),
            model: bounds.model,
            choices: bounds.images,
            price,
            fixed,
        })
    }

    /// The price a request for `model` reserves at: the most its dated variants cost, or
    /// what this worker saw an answer to it cost when that was more. An upstream that answers
    /// with another, pricier model than asked is reserved for from its first such answer on;
    /// only requests already in flight on this worker then can cost more than they reserved.
    fn reserving(&self, view: &View, model: &str, falls_back: bool) -> Price {
        let one = |model: &str| {
            let price = view.prices.reserving(model);
            match view.answered_as.borrow().get(model) {
                Some(seen) => price.max(*seen),
                None => price,
            }
        };
        // A generation may be answered by one of its fallbacks: it reserves at the dearest.
        let fallbacks = view.fallbacks.get(model).filter(|_| falls_back);
        fallbacks
            .into_iter()
            .flatten()
            .fold(one(model), |price, fallback| price.max(one(fallback)))
    }

    /// An answer to `requested` came priced at `answered`: later requests for it reserve at it
    /// when it is more than they did.
    fn learn_answer_price(
        &self,
        view: &View,
        requested: &str,
        reserved_at: &Price,
        answered: &Price,
    ) {
        let pricier = answered.input_pico > reserved_at.input_pico
            || answered.output_pico > reserved_at.output_pico
            || answered.cached_input_pico > reserved_at.cached_input_pico
            || answered.cache_write_input_pico > reserved_at.cache_write_input_pico
            || answered.cache_write_1h_input_pico > reserved_at.cache_write_1h_input_pico;
        if !pricier {
            return;
        }
        let mut seen = view.answered_as.borrow_mut();
        if seen.len() < MAX_LEARNED_MODELS || seen.contains_key(requested) {
            let entry = seen.entry(requested.to_string()).or_insert(*answered);
            *entry = entry.max(*answered);
        }
    }

    /// `/v1/usage`: the caller's own key, masked, and its budget in dollars.
    async fn usage<S: AsyncWriteRent>(
        &self,
        request: &Request,
        keep_alive: bool,
        client: &mut S,
        outcome: &mut Outcome<'_>,
    ) -> Persist {
        let id = match self.authorize(request, outcome) {
            Ok(id) => id,
            Err(e) => return self.fail(client, e, keep_alive, outcome).await,
        };
        let key = auth::credential(&request.head.headers).unwrap_or_default();
        let accounts = outcome.view.governance.charges(id).dollars;
        let read = move |s: &dyn budget::store::Store| {
            accounts
                .iter()
                .map(|account| s.account(account))
                .collect::<Result<Vec<_>, _>>()
        };
        let totals = match self.budget.ledger().call(read).await {
            Ok(totals) => totals,
            Err(e) => {
                tracing::warn!(error = %e, "usage: budget store unavailable");
                return self
                    .fail(client, Error::StoreUnavailable, keep_alive, outcome)
                    .await;
            }
        };
        let own = totals.first().copied().unwrap_or_default();
        let now = self.budget.unix_now();
        let budgets: Vec<serde_json::Value> = accounts
            .iter()
            .zip(&totals)
            .filter_map(|(id, account)| {
                let info = outcome.view.governance.account(id)?;
                Some(crate::governance::standing_json(info, account, now))
            })
            .collect();
        let mut body = serde_json::json!({
            "api_key": auth::mask(key),
            "limit_dollars": pricing::nano_to_dollars(own.limit),
            "usage_dollars": pricing::nano_to_dollars(own.spent),
            "remaining_dollars": pricing::nano_to_dollars(own.remaining()),
        });
        if !budgets.is_empty() {
            body["budgets"] = serde_json::Value::Array(budgets);
        }
        outcome.status = Some(StatusCode::OK);
        server::write_json(
            client,
            StatusCode::OK,
            body.to_string().as_bytes(),
            outcome.reply(keep_alive),
            self.timeouts.client_send,
        )
        .await
    }

    /// This worker's metrics, if they changed since `*seen`, for publishing to the registry.
    /// With the requests in flight and each active key's remaining budget as of now.
    pub fn metrics_if_changed(&self, seen: &mut metrics::Seen) -> Option<metrics::Snapshot> {
        let in_flight = self.in_flight.get() as u64;
        let remaining = self.budget.remaining(metrics::MAX_KEY_SERIES);
        let now = Instant::now();
        let view = self.view();
        let up: Vec<(String, bool)> = view
            .routing
            .upstreams
            .iter()
            .map(|u| (u.name.clone(), u.up(now)))
            .collect();
        // A reset or a new period moves a key's remaining budget with nothing recorded here;
        // a rest that ends brings an upstream back.
        let moved = in_flight != seen.in_flight || remaining != seen.remaining || up != seen.up;
        let mut snapshot = self
            .metrics
            .snapshot_if_changed(&mut seen.recorded, moved)?;
        seen.in_flight = in_flight;
        seen.remaining.clone_from(&remaining);
        snapshot.in_flight = in_flight;
        snapshot.remaining = remaining;
        // Each upstream this worker routes to, up or not; one it no longer routes to (a reload
        // took it out) is not this worker's to count.
        for (_, stats) in snapshot.upstreams.iter_mut() {
            stats.up = 0;
            stats.workers = 0;
        }
        for (name, available) in &up {
            let stats = snapshot.upstream(name);
            stats.up = u64::from(*available);
            stats.workers = 1;
        }
        seen.up = up;
        Some(snapshot)
    }

    async fn chat<'p, S: AsyncWriteRent>(
        &'p self,
        request: Request,
        keep_alive: bool,
        client: &mut S,
        outcome: &mut Outcome<'p>,
        started: Instant,
    ) -> Persist {
        if let Err(e) = identity_encoded(&request) {
            return self.fail(client, e, keep_alive, outcome).await;
        }
        let rewrite = match rewrite::rewrite_chat_body(&request.body) {
            Ok(rewrite) => rewrite,
            Err(e) => {
                return self
                    .fail(
                        client,
                        Error::MalformedBody(e.to_string()),
                        keep_alive,
                        outcome,
                    )
                    .await
            }
        };
        let chat = rewrite.request;
        let admission = self.usage_admission(
            outcome.view,
            &request,
            Billable::Generates,
            chat.model.as_deref(),
            chat.max_tokens,
            chat.choices,
        );
        if let Err(e) = self.admit(&request, admission, outcome).await {
            return self.fail(client, e, keep_alive, outcome).await;
        }
        outcome.model = chat.model;
        outcome.stream = chat.stream;
        let outgoing = Outgoing {
            request,
            with_usage: rewrite.body,
            client_asked_usage: chat.client_asked_usage,
        };
        self.forward(outgoing, keep_alive, client, outcome, started)
            .await
    }

    /// `POST /v1/messages` on an `anthropic` upstream: reserved like a chat completion (every
    /// body byte a prompt token, `max_tokens` of output), forwarded untouched, billed by the
    /// usage its stream's `message_start` and `message_delta` tell (or its JSON answer's).
    async fn messages<'p, S: AsyncWriteRent>(
        &'p self,
        request: Request,
        keep_alive: bool,
        client: &mut S,
        outcome: &mut Outcome<'p>,
        started: Instant,
    ) -> Persist {
        if let Err(e) = identity_encoded(&request) {
            return self.fail(client, e, keep_alive, outcome).await;
        }
        let bounds = match billing::messages_bounds(&request.body) {
            Ok(bounds) => bounds,
            Err(e) => {
                return self
                    .fail(client, Error::MalformedBody(e), keep_alive, outcome)
                    .await
            }
        };
        let mut admission = self.usage_admission(
            outcome.view,
            &request,
            Billable::Generates,
            Some(&bounds.model),
            bounds.max_tokens,
            1,
        );
        let price = &admission.price;
        if bounds.expands {
            // The body bounds nothing: the model's whole context window is reserved (a million
            // tokens only where the client asked for them).
            let wide = request
                .head
                .headers
                .get_all("anthropic-beta")
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.contains("context-1m")));
            let window = price.max_input_tokens.unwrap_or(200_000);
            let window = if wide { window } else { window.min(200_000) };
            let whole = estimate::context_window_estimate(
                price,
                window,
                request.body.len(),
                bounds.max_tokens,
                self.default_max_output_tokens,
            );
            admission.estimate = admission.estimate.max(whole);
        }
        let searches = estimate::web_searches_cost(&admission.price, bounds.web_searches);
        admission.estimate = admission.estimate.saturating_add(searches);
        if let Err(e) = self.admit(&request, admission, outcome).await {
            return self.fail(client, e, keep_alive, outcome).await;
        }
        outcome.model = Some(bounds.model);
        outcome.stream = bounds.stream;
        self.forward(
            Outgoing::as_is(request),
            keep_alive,
            client,
            outcome,
            started,
        )
        .await
    }

    /// Sends the request to an upstream serving its model and relays the answer. Before any
    /// byte of an answer went to the client, a failure another upstream may not have (see
    /// upstream/retry.rs) sends it to the next upstream serving the model, never the same one
    /// twice, up to `upstream_max_attempts` and within `upstream_total_timeout_ms`; a pool key
    /// the provider refused is followed by another key of the same upstream. What may be
    /// repeated: a request that provably did not reach its upstream, or that the upstream
    /// turned away (429, 503, 529), always; one that reached it and got no answer (or a 500,
    /// 502, 504), only if repeating it is safe: a billed generation (the attempt given up on
    /// is charged its reservation, its provider may be generating it) or a free idempotent
    /// request. Never an upload or a job another upstream would make twice.
    async fn forward<'p, S: AsyncWriteRent>(
        &'p self,
        outgoing: Outgoing,
        keep_alive: bool,
        client: &mut S,
        outcome: &mut Outcome<'p>,
        started: Instant,
    ) -> Persist {
        let view = outcome.view;
        let request = &outgoing.request;
        // A route Aura does not bill (moderations, assistants, …) still names its model: it is
        // routed by it too (and an Azure upstream names its deployment by it). With one
        // OpenAI-compatible upstream there is nothing to choose: no parse.
        let choosing = view.routing.upstreams.len() > 1
            || view.routing.upstreams.iter().any(|u| u.azure.is_some());
        let routed_by = match &outcome.model {
            Some(model) => Some(model.clone()),
            None if choosing && !request.body.is_empty() => billing::bounds_of(&request.body).model,
            None => None,
        };
        let mut model = routed_by.as_deref();
        if let Some(refused) = model.filter(|m| !outcome.may_use(m)) {
            let e = Error::ModelNotAllowed(refused.chars().take(200).collect());
            return self.fail(client, e, keep_alive, outcome).await;
        }
        let allowed = view.routing.allowed(outcome.pinned);
        if let Err(e) = view.routing.check(model, outcome.api, allowed) {
            return self.fail(client, e, keep_alive, outcome).await;
        }
        // The models a generation may go on to when no upstream serving its own is left (or
        // up), in order; never an upload's, a job's or a free route's.
        let generates = matches!(
            outcome.route,
            Route::ChatCompletions
                | Route::Messages
                | Route::Api(Billing::Usage(Billable::Generates))
        );
        let mut fallbacks = Fallbacks::new(
            model
                .filter(|_| generates)
                .and_then(|m| view.fallbacks.get(m))
                .map_or(&[], Vec::as_slice),
            outcome.models_allowed,
        );
        // Asked twice, such a request costs nothing and changes nothing: a free route's, by an
        // idempotent method.
        let idempotent_and_free = outcome.route == Route::Api(Billing::Free)
            && outcome.bill.is_none()
            && matches!(
                request.head.method,
                Method::GET | Method::HEAD | Method::OPTIONS
            );
        let repeatable = outcome.bill.is_some() || idempotent_and_free;
        let deadline = view.routing.total_timeout.map(|t| started + t);
        let mut tried = Tried::within(allowed);
        // A pool key refused: the same upstream again, with one of its other keys.
        let mut same_upstream: Option<usize> = None;
        let mut last_error: Option<Error> = None;
        let answered = loop {
            let now = Instant::now();
            let chosen = match same_upstream.take() {
                Some(chosen) => chosen,
                None => {
                    // An upstream of the model that is up; else one of its fallbacks', in order
                    // (each with its own upstreams: one may serve both); else, as a last try,
                    // one that is down.
                    let mut next = view.routing.next_up(model, outcome.api, &tried, now);
                    while next.is_none() {
                        let Some(fallback) = fallbacks.advance(
                            view,
                            outcome.api,
                            &request.body,
                            &outgoing.with_usage,
                        ) else {
                            break;
                        };
                        model = Some(fallback);
                        if outcome.model.is_some() {
                            outcome.model = Some(fallback.to_string());
                        }
                        tried = Tried::within(allowed);
                        tracing::info!(model = fallback, "falling back to another model");
                        next = view.routing.next_up(model, outcome.api, &tried, now);
                    }
                    let next = next.or_else(|| view.routing.next(model, outcome.api, &tried, now));
                    match next {
                        Some(chosen) => {
                            tried.keys = 0;
                            chosen
                        }
                        // `check` found a candidate, and attempts stop before none is left.
                        None => {
                            break Err(last_error.take().unwrap_or_else(|| {
                                Error::model_not_found(model.unwrap_or_default())
                            }))
                        }
                    }
                }
            };
            let upstream = &view.routing.upstreams[chosen];
            tried.upstreams |= 1 << chosen;
            let key = if tried.keys == 0 {
                upstream.keys.pick(now)
            } else {
                upstream.keys.pick_untried(now, tried.keys)
            };
            if let Some(k) = key {
                tried.keys |= 1 << k;
            }
            let mode = view.directory.mode();
            let credential =
                match self.credential(mode, upstream, key, outcome.upstream_key.as_ref()) {
                    Ok(credential) => credential,
                    Err(e) => break Err(e),
                };
            // Strip the usage event only when Aura asked for it and the client did not.
            let (plain, with_usage) = match &fallbacks.bodies {
                Some((plain, with_usage)) => (plain.as_slice(), with_usage.as_deref()),
                None => (request.body.as_slice(), outgoing.with_usage.as_deref()),
            };
            let (body, strip_usage_event) = match with_usage {
                Some(body) if upstream.inject_stream_usage => (body, !outgoing.client_asked_usage),
                _ => (plain, false),
            };
            let mut bytes = self.buffers.take();
            let written = outbound::write_request(
                &request.head,
                body,
                credential,
                upstream,
                model,
                &mut bytes,
            );
            if let Err(e) = written {
                // A model this upstream cannot name (an Azure deployment): the next may; its
                // health is untouched.
                self.buffers.give(bytes);
                if outcome.attempts < view.routing.max_attempts
                    && (view.routing.has_next(model, outcome.api, &tried)
                        || fallbacks.ready(view, outcome.api, &request.body, &outgoing.with_usage))
                {
                    last_error = Some(e);
                    continue;
                }
                break Err(e);
            }
            outcome.attempts += 1;
            outcome.upstream = Some(upstream.name.as_str());
            outcome.attempt_sent = false;
            outcome.deadline_cut = false;
            let counted = view.routing.picker.start(chosen);
            upstream.health.begin(&view.routing.health, now);
            if let Some(pooled) = key.and_then(|k| upstream.keys.get(k)) {
                pooled.health.begin(&view.routing.health.for_keys(), now);
            }
            let result = self
                .exchange(
                    upstream,
                    bytes,
                    idempotent_and_free,
                    outcome,
                    started,
                    deadline,
                )
                .await;
            let now = Instant::now();
            // Room for another attempt: attempts left, and time enough to make one.
            let more = outcome.attempts < view.routing.max_attempts
                && deadline.is_none_or(|d| d.saturating_duration_since(now) >= MIN_ATTEMPT_TIME);
            let elsewhere = more
                && (view.routing.has_next(model, outcome.api, &tried)
                    || fallbacks.ready(view, outcome.api, &request.body, &outgoing.with_usage));
            match result {
                Ok((conn, head, buffered)) => {
                    let status = head.status.as_u16();
                    let judged = view.routing.judge_answer(chosen, key, &head, now);
                    let go_on = match judged {
                        Judgement::Answer => false,
                        Judgement::KeyRefused => {
                            let other_key =
                                more && upstream.keys.pick_untried(now, tried.keys).is_some();
                            if other_key {
                                same_upstream = Some(chosen);
                            } else if !(status == 429 && elsewhere) {
                                // The provider's answer is about the operator's key, not the
                                // client's: it is not relayed.
                                self.metrics
                                    .record_attempt(&upstream.name, AttemptOutcome::KeyRefused);
                                break Err(Error::UpstreamKeysRefused(upstream.name.clone()));
                            }
                            true
                        }
                        Judgement::NotTaken => elsewhere,
                        Judgement::Failed => elsewhere && repeatable,
                    };
                    if go_on {
                        let kind = match judged {
                            Judgement::KeyRefused => AttemptOutcome::KeyRefused,
                            _ => AttemptOutcome::RetryableStatus,
                        };
                        self.metrics.record_attempt(&upstream.name, kind);
                        tracing::debug!(upstream = %upstream.name, status, "trying again");
                        continue;
                    }
                    self.metrics
                        .record_attempt(&upstream.name, AttemptOutcome::Answered);
                    outcome.answered_by = Some(upstream.name.as_str());
                    break Ok((upstream, counted, conn, head, buffered, strip_usage_event));
                }
                Err(e) => {
                    let (kind, transient) = AttemptOutcome::of_error(&e);
                    self.metrics.record_attempt(&upstream.name, kind);
                    if outcome.deadline_cut {
                        // Aura's own deadline, not the upstream's failure: no judgement.
                        break Err(e);
                    }
                    if transient {
                        view.routing.judge_failure(chosen, now);
                    }
                    let sent = outcome.attempt_sent;
                    if !(transient && elsewhere && (!sent || repeatable)) {
                        break Err(e);
                    }
                    if sent {
                        if let Err(refused) = self.charge_given_up(outcome).await {
                            break Err(refused);
                        }
                    }
                    tracing::debug!(upstream = %upstream.name, error = %e, "trying the next upstream");
                    last_error = Some(e);
                }
            }
        };
        let (upstream, _counted, mut conn, head, buffered, strip_usage_event) = match answered {
            Ok(answer) => answer,
            Err(e) => return self.fail(client, e, keep_alive, outcome).await,
        };
        outcome.status = Some(head.status);
        let mut head = head;
        if let Some(rate_headers) = &outcome.rate_headers {
            rate_headers.replace_in(&mut head.headers);
        }
        let framing = match h1::response_framing(&request.head.method, &head) {
            Ok(framing) => framing,
            Err(e) => return self.fail(client, e, keep_alive, outcome).await,
        };
        let kind = BodyKind::of(&head.headers);
        let client_http11 = request.head.minor_version >= 1;
        let relay = Relay::new(
            &head,
            framing,
            kind,
            strip_usage_event && kind == BodyKind::EventStream,
            keep_alive,
            client_http11,
        )
        .speaking(outcome.api);
        let end = relay
            .run(
                &mut conn,
                client,
                buffered,
                relay::Worker {
                    pool: &self.buffers,
                    drains: &self.drains,
                },
                // The client side's timeouts are the process's (a reload does not change them).
                Timeouts {
                    client_head: self.timeouts.client_head,
                    idle: self.timeouts.idle,
                    client_send: self.timeouts.client_send,
                    ..upstream.timeouts
                },
                started,
                &mut |end: &RelayEnd| {
                    take_body(end, outcome);
                    self.bill(outcome);
                },
            )
            .await;
        self.settle_relay(upstream, conn, end, outcome)
    }

    /// A billed request's attempt that reached its upstream and got no answer is given up for
    /// another: its provider may be generating it, so its reservation is charged, and the next
    /// attempt holds a fresh one. The fresh one is reserved first: refused (the key cannot pay
    /// for another attempt), the request ends here, billed the one it holds.
    async fn charge_given_up<'p>(&'p self, outcome: &mut Outcome<'p>) -> Result<(), Error> {
        let Some(bill) = outcome.bill.as_mut() else {
            return Ok(());
        };
        let (accounts, amount) = (bill.reservation.accounts(), bill.reservation.amount_nano());
        match self.budget.reserve_all(accounts, amount).await {
            Ok(fresh) => {
                let given_up = std::mem::replace(&mut bill.reservation, fresh);
                given_up.settle(amount);
                outcome.given_up_nano = outcome.given_up_nano.saturating_add(amount);
                Ok(())
            }
            Err(refusal) => {
                outcome.abandoned = true;
                Err(refusal_error(refusal, &outcome.view.governance))
            }
        }
    }

    /// The credential for `upstream`: a key of its own pool; else a virtual key's
    /// `upstream_key`; else (passthrough) the client's own. A virtual key is never sent on.
    fn credential<'a>(
        &self,
        mode: KeyMode,
        upstream: &'a Upstream,
        key: Option<usize>,
        upstream_key: Option<&'a Secret>,
    ) -> Result<Credential<'a>, Error> {
        if let Some(pooled) = key.and_then(|k| upstream.keys.get(k)) {
            return Ok(Credential::Pool(pooled.header_value()));
        }
        match (upstream_key, mode) {
            (Some(key), _) => Ok(Credential::Virtual(key)),
            (None, KeyMode::Passthrough) => Ok(Credential::Client),
            // Refused at start (a virtual key without upstream_key needs every upstream to
            // have keys); never forward the virtual key itself.
            (None, KeyMode::Virtual) => Err(Error::InvalidKey),
        }
    }

    fn settle_relay(
        &self,
        upstream: &Upstream,
        conn: Conn,
        end: RelayEnd,
        outcome: &mut Outcome<'_>,
    ) -> Persist {
        take_body(&end, outcome);
        outcome.ttft_overhead = end.first_byte_overhead;
        outcome.ttft = end.ttft;
        outcome.response_bytes = end.body_bytes;
        outcome.abandoned = end.abandoned;
        outcome.error = end.error;
        if end.upstream_reusable {
            upstream.put_back(conn);
        }
        end.client_persist
    }

    /// Sends the request and reads the response head. The request is sent again, once, on a
    /// fresh connection only when it provably did not reach the upstream: a pooled connection
    /// refused its first write (nothing of the request was taken). Once any byte of it was
    /// written, the upstream may have started (and charged for) the answer: no retry, unless
    /// the request is free and idempotent (GET, HEAD, OPTIONS of an unbilled route) and the
    /// pooled connection closed before any answer byte (the upstream's idle close racing it).
    async fn exchange(
        &self,
        upstream: &Upstream,
        request: Vec<u8>,
        idempotent_and_free: bool,
        outcome: &mut Outcome<'_>,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<(Conn, ResponseHead, Vec<u8>), Error> {
        let mut request = request;
        let timing = HeadTiming {
            started,
            deadline,
            first_byte: upstream.timeouts.upstream_first_byte,
            read: upstream.timeouts.upstream_read,
        };
        if let Some(conn) = upstream.pooled() {
            match self
                .send_and_read_head(conn, request, idempotent_and_free, outcome, timing)
                .await
            {
                Attempt::Answered(conn, head, rest) => return Ok((conn, head, rest)),
                Attempt::Failed(e) => return Err(e),
                Attempt::DeadBeforeAnswer(back) => request = back,
            }
        }
        let (connect, cut) = timing.within(upstream.timeouts.upstream_connect);
        let conn = match upstream.connect_within(connect).await {
            Ok(conn) => conn,
            Err(e) => {
                outcome.deadline_cut = cut && matches!(e, Error::UpstreamTimeout);
                self.buffers.give(request);
                return Err(e);
            }
        };
        match self
            .send_and_read_head(conn, request, false, outcome, timing)
            .await
        {
            Attempt::Answered(conn, head, rest) => Ok((conn, head, rest)),
            Attempt::Failed(e) => Err(e),
            Attempt::DeadBeforeAnswer(_) => Err(Error::UpstreamReset),
        }
    }

    /// One attempt. `may_retry`: a connection that closes before any answer byte gives the
    /// request back (a pooled connection the upstream closed as it was taken; only for a
    /// request that costs nothing and changes nothing if asked twice).
    async fn send_and_read_head(
        &self,
        mut conn: Conn,
        request: Vec<u8>,
        may_retry: bool,
        outcome: &mut Outcome<'_>,
        timing: HeadTiming,
    ) -> Attempt {
        let started = timing.started;
        // An upstream that takes no bytes (overloaded, a stuck balancer) must not hold the
        // request past its read timeout or the deadline of all attempts.
        let (write_limit, cut) = timing.within(timing.read);
        let sending = monoio::time::timeout(write_limit, send_request(&mut conn, request)).await;
        let (written, request) = match sending {
            Ok(sent) => sent,
            Err(_) => {
                // Some of it may have gone: it counts as sent.
                if let Some(bill) = outcome.bill.as_mut() {
                    bill.mark_sent();
                }
                outcome.attempt_sent = true;
                outcome.deadline_cut = cut;
                return Attempt::Failed(Error::UpstreamTimeout);
            }
        };
        if let Sent::Nothing = written {
            return Attempt::DeadBeforeAnswer(request);
        }
        // From now on the upstream may be generating (and billing) an answer.
        if let Some(bill) = outcome.bill.as_mut() {
            bill.mark_sent();
        }
        outcome.attempt_sent = true;
        if let Sent::Part = written {
            return Attempt::Failed(Error::UpstreamReset);
        }
        outcome.to_upstream = Some(started.elapsed());
        let mut request = Some(request);
        if !may_retry {
            self.buffers.give(request.take().unwrap_or_default());
        }
        let mut buf = self.buffers.take();
        let mut limit = timing.first_byte;
        let mut answered = false;
        loop {
            // What was read is parsed before reading again: an interim 1xx and the final head
            // may come in one read.
            while !buf.is_empty() {
                match h1::parse_response(&buf, self.limits.max_headers) {
                    Err(e) => return Attempt::Failed(e),
                    Ok(None) if buf.len() > self.limits.max_head_bytes => {
                        return Attempt::Failed(Error::UpstreamProtocol("response head too large"))
                    }
                    Ok(None) => break,
                    // Interim 1xx responses (never 101: Aura does not forward Upgrade) are
                    // skipped.
                    Ok(Some(head)) if head.status.is_informational() => {
                        buf.drain(..head.len);
                    }
                    Ok(Some(head)) => {
                        if let Some(request) = request {
                            self.buffers.give(request);
                        }
                        // The body bytes that came with the head move to the front of their
                        // buffer rather than to a new one.
                        buf.drain(..head.len);
                        return Attempt::Answered(conn, head, buf);
                    }
                }
            }
            // Every read ends by the deadline of all attempts too.
            let (within, cut) = timing.within(limit);
            match net::read_more_within(&mut conn, &mut buf, relay::READ_BUF_BYTES, within).await {
                Timed::TimedOut => {
                    outcome.deadline_cut = cut;
                    return Attempt::Failed(Error::UpstreamTimeout);
                }
                Timed::Done(Ok(0)) | Timed::Done(Err(_)) => {
                    return match request {
                        // Not a byte of an answer (not even a 1xx): the upstream closed as it
                        // was asked.
                        Some(request) if !answered => Attempt::DeadBeforeAnswer(request),
                        _ => Attempt::Failed(Error::UpstreamReset),
                    };
                }
                Timed::Done(Ok(_)) => answered = true,
            }
            limit = timing.read;
        }
    }

    async fn fail<S: AsyncWriteRent>(
        &self,
        client: &mut S,
        error: Error,
        keep_alive: bool,
        outcome: &mut Outcome<'_>,
    ) -> Persist {
        outcome.status = Some(error.status());
        let body = match outcome.api {
            Api::OpenAi => error.body(),
            Api::Anthropic => error.anthropic_body(),
        };
        let rate_headers = outcome.rate_headers.map(|h| h.pairs()).unwrap_or_default();
        let written = server::write_error(
            client,
            &error,
            &body,
            &rate_headers,
            outcome.reply(keep_alive),
            self.timeouts.client_send,
        )
        .await;
        outcome.error = Some(error);
        if written && keep_alive {
            Persist::KeepAlive
        } else {
            Persist::Close
        }
    }
}

/// How long an attempt may wait for its response head.
#[derive(Clone, Copy)]
struct HeadTiming {
    /// The request's arrival.
    started: Instant,
    /// The end of all attempts together, if set.
    deadline: Option<Instant>,
    /// Request sent → the answer's first byte.
    first_byte: Duration,
    /// Between two reads of the head after that.
    read: Duration,
}

impl HeadTiming {
    /// `limit`, or less where the deadline is nearer; and whether the deadline is what
    /// bounds it.
    fn within(&self, limit: Duration) -> (Duration, bool) {
        match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                (limit.min(left), left < limit)
            }
            None => (limit, false),
        }
    }
}

enum Attempt {
    Answered(Conn, ResponseHead, Vec<u8>),
    /// The connection refused the request's first write (nothing of it reached the upstream),
    /// or closed before any answer to a request that may be asked twice: it comes back for a
    /// retry.
    DeadBeforeAnswer(Vec<u8>),
    Failed(Error),
}

/// How much of a request went to the upstream.
enum Sent {
    All,
    /// Some of it: the upstream may have read it.
    Part,
    /// Not a byte: the connection refused the first write of a plain connection. (Over TLS
    /// one write may send several records before failing: never `Nothing`.)
    Nothing,
}

/// Writes the whole request, telling whether a failed write sent any of it.
async fn send_request(conn: &mut Conn, request: Vec<u8>) -> (Sent, Vec<u8>) {
    let tls = conn.is_tls();
    let (first, request) = conn.write(request).await;
    let n = match first {
        Err(_) if tls => return (Sent::Part, request),
        Err(_) => return (Sent::Nothing, request),
        Ok(n) => n,
    };
    if n >= request.len() {
        return (Sent::All, request);
    }
    match net::write_from(conn, request, n).await {
        (Ok(()), request) => (Sent::All, request),
        (Err(_), request) => (Sent::Part, request),
    }
}

impl<S: AsyncReadRent + AsyncWriteRent> Handler<S> for Proxy {
    async fn handle(&self, request: Request, keep_alive: bool, client: &mut S) -> Persist {
        let started = Instant::now();
        let _in_flight = InFlight::enter(&self.in_flight);
        // The configuration this request follows to its end, a reload meanwhile or not.
        let view = self.view();
        let view: &View = &view;
        // Stopping: this answer closes its connection, so keep-alive clients move elsewhere.
        let keep_alive = keep_alive && !self.stopping.get();
        let head_only = request.head.method == Method::HEAD;
        // Routed on its canonical path, and that path is the one forwarded.
        let mut request = request;
        let target = match route::canonical(&request.head.target) {
            Ok(target) if route::forwardable(&request.head.method) => target,
            refused => {
                let mut settling = Settling::new(self, view, Route::Unparsed, head_only, started);
                // Refused before its path is made canonical: its spelling says its API.
                let raw = request.head.target.to_ascii_lowercase();
                if raw.starts_with("/v1/messages") && view.routing.speaks_anthropic() {
                    settling.outcome.api = Api::Anthropic;
                }
                let error = match refused {
                    Ok(_) => Error::MethodNotAllowed {
                        allow: route::FORWARDED_METHODS,
                    },
                    Err(e) => Error::BadPath(e),
                };
                let persist = self
                    .fail(client, error, keep_alive, &mut settling.outcome)
                    .await;
                settling.done();
                return persist;
            }
        };
        request.head.target = target.origin_form();
        // Anthropic's routes, where an `anthropic` upstream serves them: its upstreams, its
        // errors' shape.
        let messages = target.path == "/v1/messages" || target.path.starts_with("/v1/messages/");
        let anthropic = messages && view.routing.speaks_anthropic();
        let route = match Route::of(&request.head.method, &target.path) {
            // With a control-plane listener, the data plane does not answer for it.
            Route::Metrics | Route::Admin if self.control_elsewhere => Route::NotFound,
            // Counting tokens is free where Aura serves Anthropic's API; elsewhere it is any
            // unknown route, as before.
            Route::Api(Billing::Free)
                if target.path == "/v1/messages/count_tokens" && !anthropic =>
            {
                Route::Api(Billing::Unpriced)
            }
            route => route,
        };
        let mut settling = Settling::new(self, view, route, head_only, started);
        let outcome = &mut settling.outcome;
        if anthropic {
            outcome.api = Api::Anthropic;
        }
        let persist = match route {
            Route::Health | Route::Metrics | Route::Usage
                if !matches!(request.head.method, Method::GET | Method::HEAD) =>
            {
                let error = Error::MethodNotAllowed { allow: "GET, HEAD" };
                self.fail(client, error, keep_alive, outcome).await
            }
            Route::Health => {
                outcome.status = Some(StatusCode::OK);
                let reply = outcome.reply(keep_alive);
                let body = br#"{"status":"ok"}"#;
                server::write_json(
                    client,
                    StatusCode::OK,
                    body,
                    reply,
                    self.timeouts.client_send,
                )
                .await
            }
            Route::Metrics => {
                outcome.status = Some(StatusCode::OK);
                let text = metrics::prom::render(&self.registry);
                server::write_body(
                    client,
                    StatusCode::OK,
                    metrics::prom::CONTENT_TYPE,
                    text.as_bytes(),
                    outcome.reply(keep_alive),
                    self.timeouts.client_send,
                )
                .await
            }
            Route::ChatCompletions => {
                self.chat(request, keep_alive, client, outcome, started)
                    .await
            }
            Route::Messages if outcome.api == Api::Anthropic => {
                self.messages(request, keep_alive, client, outcome, started)
                    .await
            }
            Route::Messages => {
                self.pass_through(
                    Billing::Messages,
                    request,
                    keep_alive,
                    client,
                    outcome,
                    started,
                )
                .await
            }
            Route::Usage => self.usage(&request, keep_alive, client, outcome).await,
            Route::Admin => self.admin(&request, keep_alive, client, outcome).await,
            Route::Api(billing) => {
                self.pass_through(billing, request, keep_alive, client, outcome, started)
                    .await
            }
            // `of` never yields Unparsed: it is refused above, or by the server.
            Route::NotFound | Route::Unparsed => {
                let error = Error::NotFound(
                    request
                        .head
                        .target
                        .split('?')
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
                self.fail(client, error, keep_alive, outcome).await
            }
        };
        settling.done();
        persist
    }

    fn refused(&self, error: &Error) {
        let view = self.view();
        let mut outcome = Outcome {
            status: Some(error.status()),
            ..Outcome::new(Route::Unparsed, &view)
        };
        self.settle(&mut outcome, Some(error), Instant::now());
    }
}

/// A request's outcome until it is settled. Every request is settled exactly once: by `done`,
/// or, for one whose handling was dropped (cut at the end of the shutdown grace), when this is
/// dropped: its access-log record says so.
struct Settling<'p> {
    proxy: &'p Proxy,
    outcome: Outcome<'p>,
    started: Instant,
    settled: bool,
}

impl<'p> Settling<'p> {
    fn new(
        proxy: &'p Proxy,
        view: &'p View,
        route: Route,
        head_only: bool,
        started: Instant,
    ) -> Settling<'p> {
        let mut outcome = Outcome::new(route, view);
        outcome.head_only = head_only;
        Settling {
            proxy,
            outcome,
            started,
            settled: false,
        }
    }

    fn done(mut self) {
        self.settle();
    }

    fn settle(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let error = self.outcome.error.take();
        self.proxy
            .settle(&mut self.outcome, error.as_ref(), self.started);
    }
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        if !self.settled {
            // Sent, its upstream may have generated (and charged) the whole answer: billed the
            // reservation, as an answer whose client left. Never sent, it cost nothing.
            self.outcome.abandoned = self
                .outcome
                .bill
                .as_ref()
                .is_some_and(|bill| bill.reservation.is_sent());
            self.outcome.error = Some(Error::ShutdownCut);
            self.outcome
                .status
                .get_or_insert(Error::ShutdownCut.status());
            self.settle();
        }
    }
}

impl Proxy {
    /// The end of every request: its bill (the reservation becomes the real cost), its metrics,
    /// and one access-log record. Health checks and scrapes are neither counted nor logged.
    fn settle<'p>(&'p self, outcome: &mut Outcome<'p>, error: Option<&Error>, started: Instant) {
        if matches!(outcome.route, Route::Health | Route::Metrics) {
            return;
        }
        self.bill(outcome);
        let charge = outcome.charge;
        self.metrics.record(&metrics::Record {
            route: outcome.route.label(),
            status: outcome.status.map(|s| s.as_u16()).unwrap_or(0),
            error: error.map(Error::label),
            ttft_overhead: outcome.ttft_overhead,
            to_upstream: outcome.to_upstream,
            // Usage that was not believed is not counted as tokens either.
            usage: outcome
                .usage
                .as_ref()
                .filter(|_| charge.is_none_or(|c| c.basis != Basis::Implausible)),
            usage_missing: charge.is_some_and(|c| c.basis == Basis::Estimated),
            usage_implausible: charge.is_some_and(|c| c.basis == Basis::Implausible),
            cost_nano: charge.map_or(0, |c| c.cost_nano),
            default_price: charge.is_some_and(|c| c.matched == Match::Default),
            billed: charge.map(|c| (c.key, c.model)),
            upstream: outcome.answered_by,
            ttft: outcome.ttft,
        });
        let n = self.requests.get() + 1;
        self.requests.set(n);
        let request_id = format!("{}{n:x}", self.request_prefix);
        log_access(outcome, charge, error, started, &request_id);
        if let (Some(recorder), Some(charge)) = (&self.recorder, charge) {
            recorder.record(spend_line(outcome, &charge, request_id, started));
        }
    }

    /// A billable request's reservation becomes its cost: the usage reported, priced at the
    /// response's model, or an estimate. Runs once: before the response's last bytes reach the
    /// client when the relay completes (so a kill after the client has its answer cannot lose
    /// the spend), else at the end. A key the upstream refused (401/403) leaves nothing behind.
    fn bill<'p>(&'p self, outcome: &mut Outcome<'p>) {
        let Some(bill) = outcome.bill.take() else {
            return;
        };
        let status = outcome.status.map(|s| s.as_u16());
        let tokens_used = match &outcome.usage {
            Some(usage) => usage.prompt_tokens.saturating_add(usage.completion_tokens),
            // No usage: what it reserved, if it may have been answered at all.
            None if outcome.status.is_some_and(|s| s.is_success()) => bill.tokens,
            None => 0,
        };
        bill.rates.settle(tokens_used.min(self.max_usage_tokens));
        let view = outcome.view;
        if matches!(status, Some(401 | 403)) {
            let key = bill.reservation.key();
            bill.reservation.settle_refused_key();
            outcome.requested = bill.requested;
            // Nothing for this answer; attempts given up on before it were charged, and are
            // recorded as this request's.
            let (_, matched, model) = view.prices.resolve(outcome.model.as_deref().unwrap_or(""));
            let given_up = outcome.given_up_nano;
            if given_up > 0 {
                let report = view.governance.model_report(model.map(|m| m.as_ref()));
                self.budget.charge(report, given_up);
                outcome.charge = Some(Charge {
                    key,
                    model,
                    cost_nano: given_up,
                    basis: Basis::Failed,
                    matched,
                });
            }
            return;
        }
        let (price, matched, model) = view.prices.resolve(outcome.model.as_deref().unwrap_or(""));
        let reserved = estimate::Reserved {
            nano: bill.reservation.amount_nano(),
            request_bytes: bill.request_bytes,
            choices: bill.choices,
            ceiling: self.max_usage_tokens,
            fixed: bill.fixed,
        };
        let answer = estimate::Answer {
            usage: outcome.usage.as_ref(),
            succeeded: outcome.status.is_some_and(|s| s.is_success()),
            response_bytes: outcome.response_bytes,
            abandoned: outcome.abandoned,
        };
        let (cost, basis) = estimate::settle_cost(&price, &reserved, &answer);
        if basis == Basis::Reported {
            if let Some(requested) = &bill.requested {
                self.learn_answer_price(view, requested, &bill.reserved_at, &price);
            }
        }
        if basis == Basis::Implausible {
            tracing::warn!(
                key_id = %bill.reservation.key(),
                model = outcome.model.as_deref().unwrap_or(""),
                usage = ?outcome.usage,
                "the upstream reported usage beyond what the model can do: billed the reservation"
            );
        }
        let key = bill.reservation.key();
        bill.reservation.settle(cost);
        outcome.requested = bill.requested;
        // The record of the model's spend, as answered (the key's and its team's are in the
        // reservation).
        let charged = cost.saturating_add(outcome.given_up_nano);
        let answered = view.governance.model_report(model.map(|m| m.as_ref()));
        self.budget.charge(answered, charged);
        outcome.charge = Some(Charge {
            key,
            model,
            // With the reservations of attempts given up on (already settled).
            cost_nano: cost.saturating_add(outcome.given_up_nano),
            basis,
            matched,
        });
    }

    /// Any other `/v1` route, by how it is billed: by its usage (admitted and billed like chat
    /// completions), free (forwarded; a virtual key is checked and swapped), or unpriced (it
    /// costs money Aura cannot price: refused in virtual mode unless the operator allows it).
    /// Every forwarded request carries one credential at most: the one billed.
    async fn pass_through<'p, S: AsyncWriteRent>(
        &'p self,
        billing: Billing,
        request: Request,
        keep_alive: bool,
        client: &mut S,
        outcome: &mut Outcome<'p>,
        started: Instant,
    ) -> Persist {
        if let Some(listing) = &outcome.view.routing.listing {
            let path = request.head.target.split('?').next().unwrap_or_default();
            if path == "/v1/models" {
                if let Err(e) = self.authorize(&request, outcome) {
                    return self.fail(client, e, keep_alive, outcome).await;
                }
                outcome.status = Some(StatusCode::OK);
                let reply = outcome.reply(keep_alive);
                return server::write_json(
                    client,
                    StatusCode::OK,
                    listing,
                    reply,
                    self.timeouts.client_send,
                )
                .await;
            }
        }
        let virtual_key = outcome.view.directory.mode() == KeyMode::Virtual;
        let admitted = match billing {
            Billing::Usage(kind) => {
                let bounds = billing::bounds_of(&request.body);
                let admission = self.usage_admission(
                    outcome.view,
                    &request,
                    kind,
                    bounds.model.as_deref(),
                    bounds.max_tokens,
                    bounds.choices,
                );
                let admitted = self.admit(&request, admission, outcome).await;
                outcome.model = bounds.model;
                admitted
            }
            Billing::Images | Billing::Speech | Billing::Transcription => {
                match self.media_admission(outcome.view, billing, &request) {
                    Some(admission) => {
                        let model = admission.model.clone();
                        let admitted = self.admit(&request, admission, outcome).await;
                        outcome.model = model;
                        admitted
                    }
                    None => self.unpriced(&request, outcome, virtual_key),
                }
            }
            // Messages without an `anthropic` upstream: forwarded as any unknown route.
            Billing::Unpriced | Billing::Messages => self.unpriced(&request, outcome, virtual_key),
            Billing::Chat | Billing::Free => self.forwarded_as_is(&request, outcome, virtual_key),
        };
        if let Err(e) = admitted {
            return self.fail(client, e, keep_alive, outcome).await;
        }
        self.forward(
            Outgoing::as_is(request),
            keep_alive,
            client,
            outcome,
            started,
        )
        .await
    }

    /// A route that costs money Aura cannot price: refused for a virtual key unless the
    /// operator allowed such routes; forwarded otherwise (never billed).
    fn unpriced(
        &self,
        request: &Request,
        outcome: &mut Outcome<'_>,
        virtual_key: bool,
    ) -> Result<(), Error> {
        if virtual_key && !self.allow_unpriced {
            return Err(Error::UnpricedRoute(format!(
                "{} {}",
                request.head.method,
                request.head.target.split('?').next().unwrap_or_default()
            )));
        }
        self.forwarded_as_is(request, outcome, virtual_key)
    }

    /// Forwarded unbilled: a virtual key is checked and swapped; a passthrough request may
    /// carry one credential at most.
    fn forwarded_as_is(
        &self,
        request: &Request,
        outcome: &mut Outcome<'_>,
        virtual_key: bool,
    ) -> Result<(), Error> {
        if virtual_key {
            self.authorize(request, outcome).map(|_| ())
        } else {
            auth::single_credential(&request.head.headers).map(|_| ())
        }
    }

    /// `/admin/keys…`: 404 unless an admin token is configured.
    async fn admin<S: AsyncWriteRent>(
        &self,
        request: &Request,
        keep_alive: bool,
        client: &mut S,
        outcome: &mut Outcome<'_>,
    ) -> Persist {
        let (path, query) = match request.head.target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (request.head.target.as_str(), None),
        };
        let answer = match &self.admin_token {
            None => Err(Error::NotFound(path.to_string())),
            Some(token) => {
                Admin {
                    ledger: self.budget.ledger(),
                    shared: &self.shared,
                    token,
                    period: self.period,
                }
                .handle(
                    &request.head.method,
                    path,
                    query,
                    &request.head.headers,
                    &request.body,
                )
                .await
            }
        };
        match answer {
            Ok(answer) => {
                outcome.status = Some(answer.status);
                let reply = outcome.reply(keep_alive);
                server::write_answer(client, &answer, reply, self.timeouts.client_send).await
            }
            Err(e) => self.fail(client, e, keep_alive, outcome).await,
        }
    }
}

/// The members of a set of upstreams (a bit each), in order.
fn bits(set: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| set & (1 << i) != 0)
}

/// A request's fallback models, and how far it went down them.
struct Fallbacks<'a> {
    models: &'a [String],
    /// The models the caller's key may ask for (empty: any): no other is taken.
    allowed: &'a [ModelPattern],
    /// The next fallback to consider.
    at: usize,
    /// The next fallback that can be taken, with its bodies, made ready by `ready`.
    prepared: Option<(&'a str, Bodies)>,
    /// The bodies of the fallback taken: naming its model (with the usage asked for, where
    /// the request's was).
    bodies: Option<Bodies>,
}

type Bodies = (Vec<u8>, Option<Vec<u8>>);

impl<'a> Fallbacks<'a> {
    fn new(models: &'a [String], allowed: &'a [ModelPattern]) -> Fallbacks<'a> {
        Fallbacks {
            models,
            allowed,
            at: 0,
            prepared: None,
            bodies: None,
        }
    }

    /// Whether a fallback can be taken: one some upstream serves for `api` and whose body can
    /// name it (a body serde_json refuses cannot). Made ready for `advance`.
    fn ready(
        &mut self,
        view: &'a View,
        api: Api,
        body: &[u8],
        with_usage: &Option<Vec<u8>>,
    ) -> bool {
        while self.prepared.is_none() && self.at < self.models.len() {
            let model = self.models[self.at].as_str();
            self.at += 1;
            let allowed = self.allowed.is_empty() || self.allowed.iter().any(|m| m.matches(model));
            // Whether a pinned key's upstream serves it is the attempts' to find.
            if !allowed || view.routing.check(Some(model), api, u64::MAX).is_err() {
                continue;
            }
            let Some(plain) = rewrite::with_model(body, model) else {
                continue;
            };
            let usage = with_usage
                .as_ref()
                .and_then(|b| rewrite::with_model(b, model));
            self.prepared = Some((model, (plain, usage)));
        }
        self.prepared.is_some()
    }

    /// Takes the next fallback that can be taken: its model (its bodies in `bodies`).
    fn advance(
        &mut self,
        view: &'a View,
        api: Api,
        body: &[u8],
        with_usage: &Option<Vec<u8>>,
    ) -> Option<&'a str> {
        self.ready(view, api, body, with_usage);
        let (model, bodies) = self.prepared.take()?;
        self.bodies = Some(bodies);
        Some(model)
    }
}

/// A budget's refusal, as the client hears it: which budget refused, and what it has left.
fn refusal_error(refusal: Refusal, governance: &Governance) -> Error {
    match refusal {
        Refusal::Denied {
            account,
            remaining_nano,
            estimate_nano,
        } => Error::BudgetExhausted {
            budget: governance
                .account(account)
                .map_or_else(|| "key's budget".to_string(), |a| a.describe()),
            remaining_nano,
            estimate_nano,
        },
        Refusal::Unavailable => Error::StoreUnavailable,
    }
}

/// A request's attempts so far: the upstreams tried, and the keys tried on the current one
/// (a bit each).
#[derive(Debug, Default)]
pub struct Tried {
    upstreams: u64,
    keys: u64,
}

impl Tried {
    /// None tried yet, and those outside `allowed` (a pinned key's) never to be.
    fn within(allowed: u64) -> Tried {
        Tried {
            upstreams: !allowed,
            keys: 0,
        }
    }
}

/// What an upstream's answer means for the request (`Routing::judge_answer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// It goes to the client.
    Answer,
    /// The pool key used was refused (401, 403) or rate limited (429).
    KeyRefused,
    /// The upstream turned the request away (429 on the client's credential, 503, 529): it
    /// was not acted on, and may go to another.
    NotTaken,
    /// The upstream failed (500, 502, 504): it may have acted on the request.
    Failed,
}

/// The least time left for which another attempt starts: less, and it would send the whole
/// request only to be cut by the deadline.
const MIN_ATTEMPT_TIME: Duration = Duration::from_millis(50);

/// A body Aura reads must come as it is: a compressed one would hide its model and bounds.
fn identity_encoded(request: &Request) -> Result<(), Error> {
    match request.head.headers.get(header::CONTENT_ENCODING) {
        Some(encoding) if !encoding.as_bytes().eq_ignore_ascii_case(b"identity") => {
            Err(Error::Unsupported("a compressed request body"))
        }
        _ => Ok(()),
    }
}

/// What the response body told: its usage (and the model that answered), and its size.
fn take_body(end: &RelayEnd, outcome: &mut Outcome<'_>) {
    outcome.usage = end.usage.as_ref().map(|found| {
        if outcome.model.is_none() || found.model.is_some() {
            outcome.model.clone_from(&found.model);
        }
        found.usage
    });
    outcome.response_bytes = end.body_bytes;
}

/// Counts one request in flight while it lives.
struct InFlight<'a>(&'a Cell<usize>);

impl<'a> InFlight<'a> {
    fn enter(count: &'a Cell<usize>) -> InFlight<'a> {
        count.set(count.get() + 1);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// What settle charged a billable request.
#[derive(Debug, Clone, Copy)]
struct Charge<'p> {
    key: KeyId,
    /// The price table's name for the model (none: the default price).
    model: Option<&'p Arc<str>>,
    cost_nano: u64,
    basis: Basis,
    matched: Match,
}

/// The one access-log record of a finished request. Keys never appear in it.
fn log_access(
    outcome: &Outcome,
    charge: Option<Charge>,
    error: Option<&Error>,
    started: Instant,
    request_id: &str,
) {
    let duration_us = started.elapsed().as_micros() as u64;
    let status = outcome.status.map(|s| s.as_u16()).unwrap_or(0);
    let error_detail = error.map(|e| e.to_string()).unwrap_or_default();
    let error = error.map(|e| e.label()).unwrap_or("");
    let (usage, prompt, completion, cached) = match outcome.usage {
        Some(u) => (
            "found",
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_prompt_tokens,
        ),
        None => ("none", 0, 0, 0),
    };
    let usage = match charge.map(|c| c.basis) {
        Some(Basis::Estimated) => "estimated",
        Some(Basis::Implausible) => "implausible",
        _ => usage,
    };
    let key_id = outcome.key.map(|k| k.to_string()).unwrap_or_default();
    tracing::info!(
        target: "aura::access",
        request_id,
        route = outcome.route.label(),
        status,
        key_id = key_id.as_str(),
        model = outcome.model.as_deref().unwrap_or(""),
        upstream = outcome.upstream.unwrap_or(""),
        attempts = outcome.attempts,
        stream = outcome.stream,
        usage,
        prompt_tokens = prompt,
        completion_tokens = completion,
        cached_prompt_tokens = cached,
        cost_nano_usd = charge.map_or(0, |c| c.cost_nano),
        price = match charge.map(|c| c.matched) {
            Some(Match::Exact) => "exact",
            Some(Match::Base) => "base_name",
            Some(Match::Default) => "default",
            None => "",
        },
        to_upstream_us = micros(outcome.to_upstream),
        ttft_us = micros(outcome.ttft),
        ttft_overhead_us = micros(outcome.ttft_overhead),
        duration_us,
        error,
        error_detail = error_detail.as_str(),
    );
}

/// A settled request as the spend record has it.
fn spend_line(
    outcome: &Outcome,
    charge: &Charge,
    request_id: String,
    started: Instant,
) -> spend_record::Line {
    let view = outcome.view;
    let usage = outcome.usage.unwrap_or_default();
    let millis = |d: Duration| d.as_secs_f64() * 1e3;
    spend_record::Line {
        time: iso_now_millis(),
        request_id,
        key_id: charge.key.to_string(),
        alias: view.directory.alias(charge.key).map(String::from),
        team: view.governance.team_of(charge.key).map(String::from),
        route: outcome.route.label(),
        model_requested: outcome.requested.clone(),
        model_answered: outcome.model.clone(),
        upstream: outcome.answered_by.map(String::from),
        tokens: spend_record::Tokens {
            prompt: usage.prompt_tokens,
            completion: usage.completion_tokens,
            cached_prompt: usage.cached_prompt_tokens,
            cache_write_prompt: usage.cache_write_prompt_tokens,
            media_prompt: usage.media_prompt_tokens,
        },
        cost_nano: charge.cost_nano,
        basis: match charge.basis {
            Basis::Reported => "reported",
            Basis::Fixed => "fixed",
            Basis::Estimated => "estimated",
            Basis::Implausible => "implausible",
            Basis::Failed => "failed",
        },
        ttft_ms: outcome.ttft.map(millis),
        duration_ms: millis(started.elapsed()),
        status: outcome.status.map_or(0, |s| s.as_u16()),
        attempts: outcome.attempts,
        stream: outcome.stream,
    }
}

/// The time now, `2026-12-01T12:34:56.789Z`.
fn iso_now_millis() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = budget::op::iso_time(now.as_secs());
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), now.subsec_millis())
}

/// A worker's request-id prefix: random per process, then the worker (`3f9a2c-1-`).
fn request_prefix(worker: usize) -> String {
    let mut random = [0u8; 3];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{worker}-")
}

fn micros(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        use crate::budget::estimate::Billable;
        let cases = [
            (Method::POST, "/v1/chat/completions", Route::ChatCompletions),
            (
                Method::GET,
                "/v1/chat/completions",
                Route::Api(Billing::Free),
            ),
            (Method::GET, "/v1/models", Route::Api(Billing::Free)),
            (
                Method::POST,
                "/v1/embeddings",
                Route::Api(Billing::Usage(Billable::Embeds)),
            ),
            (Method::GET, "/healthz", Route::Health),
            (Method::GET, "/metrics", Route::Metrics),
            (Method::GET, "/v1/usage", Route::Usage),
            // Aura's own paths are Aura's whatever the method (a wrong one is a 405).
            (Method::POST, "/v1/usage", Route::Usage),
            (Method::DELETE, "/admin/keys/x", Route::Admin),
            (Method::POST, "/metrics", Route::Metrics),
            (Method::GET, "/v2/x", Route::NotFound),
            (Method::GET, "/v1", Route::NotFound),
        ];
        for (method, path, route) in cases {
            assert_eq!(Route::of(&method, path), route, "{method} {path}");
        }
    }
}
