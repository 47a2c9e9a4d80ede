//! The API gateway (`platform serve gateway`): the single entry point for clients.
//!
//! It routes each request to an upstream (the order or inventory command service, the query
//! API, the saga API), picks a healthy instance, and forwards the request over HTTP.
//!
//! - **Registry**: each upstream's instances come from `--gateway-<upstream>`: base URLs and/or
//!   `dns://name:port`, re-resolved at every health round. A background task polls every
//!   instance's `/health/ready`; an instance is healthy while that answers 200. Its body also
//!   says which partitions of which topic the instance owns, which is how commands find their
//!   owner.
//! - **Partition routing**: a command names its aggregate (`/orders/{id}/...`,
//!   `/inventory/{sku}/...`; `POST /orders` derives the new order's id from its
//!   `Idempotency-Key`, which the gateway adds when the client sent none). The gateway hashes it
//!   with [`event_log::partition_for`], as the log does, and sends the command to the instance
//!   that owns that partition. Requests without an owner go round-robin.
//! - **Retries**: only idempotent requests (GET/HEAD, or a command with an `Idempotency-Key`)
//!   are retried, on another instance when there is one, after a connect error, a timeout or a
//!   502/503/504. A request that never reached an instance (connect refused) is retried whatever
//!   its method.
//! - **Circuit breaker** per instance: `--gateway-breaker-failures` consecutive failures open
//!   it; while open the instance gets no requests; after `--gateway-breaker-open-ms` one probe
//!   request goes through and closes it again on success. When every instance of an upstream is
//!   open the gateway answers 503 `/problems/circuit-open` at once.
//! - **Timeouts** per route class (commands, reads), per attempt.
//! - Every request is logged with its correlation id (`X-Correlation-Id`, generated when
//!   absent and passed upstream and back).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use command_services::http::{ApiError, MAX_BODY_BYTES};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::security::{self, Security};
use crate::settings::Settings;

const CORRELATION_ID: &str = "x-correlation-id";
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The services behind the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    Order,
    Inventory,
    Query,
    Saga,
}

impl Upstream {
    pub const ALL: [Upstream; 4] = [
        Upstream::Order,
        Upstream::Inventory,
        Upstream::Query,
        Upstream::Saga,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Upstream::Order => "order",
            Upstream::Inventory => "inventory",
            Upstream::Query => "query",
            Upstream::Saga => "saga",
        }
    }
}

/// Where a request goes: the upstream, and for a command the aggregate whose owner takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub upstream: Upstream,
    /// `(aggregate type, aggregate id)`: `("order", id)` or `("stock", sku)`.
    pub aggregate: Option<(&'static str, String)>,
    pub command: bool,
}

fn segments(path: &str) -> Vec<String> {
    path.trim_matches('/')
        .split('/')
        .map(|segment| percent_decode(segment).unwrap_or_else(|| segment.to_owned()))
        .collect()
}

fn percent_decode(raw: &str) -> Option<String> {
    if !raw.contains('%') {
        return Some(raw.to_owned());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = raw.get(index + 1..index + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The route of a request; `None` when no upstream serves it (404). `idempotency_key` is the
/// (trimmed) key the request carries and `actor` its authenticated caller, which together
/// derive a new order's id as the order service does.
pub fn route(
    method: &Method,
    path: &str,
    idempotency_key: Option<&str>,
    actor: Option<&str>,
) -> Option<Route> {
    let parts = segments(path);
    let first = parts.first().map(String::as_str).unwrap_or_default();
    let read = method == Method::GET || method == Method::HEAD;
    let to = |upstream| Route {
        upstream,
        aggregate: None,
        command: false,
    };
    match first {
        "orders" if !read => {
            let id = match parts.get(1) {
                Some(raw) => uuid::Uuid::parse_str(raw).ok().map(|id| id.to_string()),
                None => idempotency_key.map(|key| {
                    command_services::http::headers::id_for_key("order-id", key, actor).to_string()
                }),
            };
            Some(Route {
                upstream: Upstream::Order,
                aggregate: id.map(|id| ("order", id)),
                command: true,
            })
        }
        "inventory" if !read => Some(Route {
            upstream: Upstream::Inventory,
            aggregate: parts
                .get(1)
                .filter(|sku| domain::Sku::parse(sku).is_ok())
                .map(|sku| ("stock", sku.clone())),
            command: true,
        }),
        "orders" | "inventory" | "payments" => read.then(|| to(Upstream::Query)),
        "audit" | "parked" | "projections" | "replay" | "openapi.json" => Some(to(Upstream::Query)),
        "sagas" => Some(Route {
            command: !read,
            ..to(Upstream::Saga)
        }),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The registry

#[derive(Debug)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; another may go after `until`.
    HalfOpen {
        until: Instant,
    },
}

/// One instance of an upstream.
#[derive(Debug)]
pub struct Instance {
    pub base: String,
    healthy: AtomicBool,
    /// Topic → partitions this instance owns (from its `/health/ready`).
    owned: RwLock<HashMap<String, Vec<u32>>>,
    breaker: Mutex<BreakerState>,
}

impl Instance {
    fn new(base: String) -> Self {
        Instance {
            base,
            // Healthy until a health check says otherwise, so a fresh gateway serves at once.
            healthy: AtomicBool::new(true),
            owned: RwLock::new(HashMap::new()),
            breaker: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Forgets that this instance owns `partition` of `topic` (it said it does not), until its
    /// next health check says otherwise.
    fn disown(&self, topic: &str, partition: u32) {
        if let Ok(mut owned) = self.owned.write()
            && let Some(partitions) = owned.get_mut(topic)
        {
            partitions.retain(|owned| *owned != partition);
        }
    }

    fn owns(&self, topic: &str, partition: u32) -> bool {
        self.owned
            .read()
            .map(|owned| owned.get(topic).is_some_and(|p| p.contains(&partition)))
            .unwrap_or(false)
    }

    /// Could a request go to this instance now (breaker closed, or open past its time and no
    /// probe in flight)? Does not change the breaker.
    fn available(&self) -> bool {
        let now = Instant::now();
        match *self.breaker.lock().unwrap_or_else(|e| e.into_inner()) {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } | BreakerState::HalfOpen { until } => now >= until,
        }
    }

    /// Takes the right to send a request now. An open breaker past its time lets exactly one
    /// probe through (half-open); a probe that never reports back frees the slot after the
    /// open time again.
    fn admit(&self, policy: &Policy) -> bool {
        let now = Instant::now();
        let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match *breaker {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } | BreakerState::HalfOpen { until } if now >= until => {
                *breaker = BreakerState::HalfOpen {
                    until: now + policy.breaker_open,
                };
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => false,
        }
    }

    pub fn breaker_state(&self) -> &'static str {
        match *self.breaker.lock().unwrap_or_else(|e| e.into_inner()) {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }

    fn record(&self, success: bool, policy: &Policy) {
        let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        *breaker = match (&*breaker, success) {
            (_, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, false)
                if failures + 1 < policy.breaker_failures =>
            {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => {
                tracing::warn!(instance = %self.base, "circuit breaker open");
                BreakerState::Open {
                    until: Instant::now() + policy.breaker_open,
                }
            }
        };
    }
}

#[derive(Debug, Clone)]
enum Source {
    Url(String),
    Dns { host: String, port: u16 },
}

fn parse_source(raw: &str) -> anyhow::Result<Source> {
    let raw = raw.trim().trim_end_matches('/');
    if let Some(rest) = raw.strip_prefix("dns://") {
        let (host, port) = rest
            .rsplit_once(':')
            .with_context(|| format!("{raw}: dns:// needs name:port"))?;
        let port = port.parse().with_context(|| format!("{raw}: not a port"))?;
        return Ok(Source::Dns {
            host: host.to_owned(),
            port,
        });
    }
    if raw.starts_with("http://") || raw.starts_with("https://") {
        return Ok(Source::Url(raw.to_owned()));
    }
    anyhow::bail!("{raw}: an upstream is http://host:port or dns://name:port")
}

/// The instances of one upstream.
#[derive(Debug)]
pub struct Pool {
    pub upstream: Upstream,
    sources: Vec<Source>,
    instances: RwLock<Vec<Arc<Instance>>>,
    next: AtomicUsize,
}

impl Pool {
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.instances
            .read()
            .map(|instances| instances.clone())
            .unwrap_or_default()
    }

    async fn resolve(&self) {
        let mut bases = Vec::new();
        for source in &self.sources {
            match source {
                Source::Url(url) => bases.push(url.clone()),
                Source::Dns { host, port } => {
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(addresses) => {
                            let mut found: Vec<String> =
                                addresses.map(|a| format!("http://{a}")).collect();
                            found.sort();
                            found.dedup();
                            bases.extend(found);
                        }
                        Err(error) => {
                            tracing::warn!(upstream = self.upstream.name(), host, %error, "cannot resolve upstream");
                        }
                    }
                }
            }
        }
        let mut instances = self.instances.write().unwrap_or_else(|e| e.into_inner());
        // Keep the instances (and their breakers) that are still there.
        let mut kept: Vec<Arc<Instance>> = Vec::new();
        for base in bases {
            if kept.iter().any(|instance| instance.base == base) {
                continue;
            }
            match instances.iter().find(|instance| instance.base == base) {
                Some(instance) => kept.push(instance.clone()),
                None => kept.push(Arc::new(Instance::new(base))),
            }
        }
        *instances = kept;
    }

    /// The instances to try, best first: the owner of `partition` of `topic` when one is
    /// known, else healthy instances round-robin. Instances whose breaker refuses are left
    /// out; `Err` says why nothing is left.
    fn candidates(&self, owner_of: Option<(&str, u32)>) -> Result<Vec<Arc<Instance>>, ApiError> {
        let instances = self.instances();
        if instances.is_empty() {
            return Err(ApiError::Unavailable(format!(
                "no instance of upstream {} is configured or resolvable",
                self.upstream.name()
            )));
        }
        let owners: Vec<Arc<Instance>> = match owner_of {
            Some((topic, partition)) => instances
                .iter()
                .filter(|instance| instance.owns(topic, partition))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let mut ordered = if owners.is_empty() {
            let healthy: Vec<Arc<Instance>> = instances
                .iter()
                .filter(|instance| instance.healthy())
                .cloned()
                .collect();
            // With no healthy instance at all, try them all rather than refuse: readiness
            // also fails on a lagging projection, whose instance still answers (or says why
            // not); the breakers keep dead ones out.
            let healthy = if healthy.is_empty() {
                instances.clone()
            } else {
                healthy
            };
            let start = self.next.fetch_add(1, Ordering::Relaxed) % healthy.len();
            let mut rotated = healthy[start..].to_vec();
            rotated.extend_from_slice(&healthy[..start]);
            rotated
        } else {
            owners
        };
        ordered.retain(|instance| instance.available());
        if ordered.is_empty() {
            return Err(ApiError::CircuitOpen(format!(
                "the circuit breaker of every instance of upstream {} is open: retry later",
                self.upstream.name()
            )));
        }
        Ok(ordered)
    }
}

/// An upstream's answer, passed on as it is (less hop-by-hop headers).
async fn forward(response: reqwest::Response, upstream: &str) -> Result<Response, ApiError> {
    let mut out = Response::builder().status(response.status());
    if let Some(out_headers) = out.headers_mut() {
        for (name, value) in response.headers() {
            if !is_hop_by_hop(name) {
                out_headers.append(name.clone(), value.clone());
            }
        }
    }
    let bytes = response.bytes().await.map_err(|error| {
        ApiError::BadGateway(format!("upstream {upstream} broke off its answer: {error}"))
    })?;
    out.body(Body::from(bytes))
        .map_err(|error| ApiError::Internal(format!("building the gateway's answer: {error}")))
}

#[derive(Debug, Deserialize)]
struct ReadyBody {
    #[serde(default)]
    services: Vec<ReadyService>,
}

#[derive(Debug, Deserialize)]
struct ReadyService {
    topic: String,
    #[serde(default)]
    partitions: Vec<ReadyPartition>,
}

#[derive(Debug, Deserialize)]
struct ReadyPartition {
    partition: u32,
    #[serde(default)]
    stepped_down: bool,
    #[serde(default)]
    fenced: bool,
    #[serde(default)]
    loading: bool,
}

/// Timeouts, retries and breaker settings.
#[derive(Debug, Clone)]
pub struct Policy {
    pub command_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    pub health_interval: Duration,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    /// (upstream, status class) → count
    requests: Mutex<HashMap<(&'static str, u16), u64>>,
    retries: AtomicU64,
    breaker_rejections: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    pools: HashMap<Upstream, Pool>,
    policy: Policy,
    partitions: u32,
    topic_prefix: String,
    client: reqwest::Client,
    counters: Counters,
}

/// The gateway's shared state.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl Registry {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let gateway = &settings.gateway;
        let mut pools = HashMap::new();
        for (upstream, raw) in [
            (Upstream::Order, &gateway.gateway_order),
            (Upstream::Inventory, &gateway.gateway_inventory),
            (Upstream::Query, &gateway.gateway_query),
            (Upstream::Saga, &gateway.gateway_saga),
        ] {
            let sources = raw
                .iter()
                .filter(|raw| !raw.trim().is_empty())
                .map(|raw| parse_source(raw))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if sources.is_empty() {
                continue;
            }
            pools.insert(
                upstream,
                Pool {
                    upstream,
                    sources,
                    instances: RwLock::new(Vec::new()),
                    next: AtomicUsize::new(0),
                },
            );
        }
        if pools.is_empty() {
            anyhow::bail!(
                "the gateway needs at least one upstream (--gateway-order, --gateway-inventory, --gateway-query, --gateway-saga)"
            );
        }
        let policy = Policy {
            command_timeout: Duration::from_millis(gateway.gateway_command_timeout_ms),
            read_timeout: Duration::from_millis(gateway.gateway_read_timeout_ms),
            retries: gateway.gateway_retries,
            health_interval: Duration::from_millis(gateway.gateway_health_interval_ms.max(10)),
            breaker_failures: gateway.gateway_breaker_failures.max(1),
            breaker_open: Duration::from_millis(gateway.gateway_breaker_open_ms),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // Below the parts' header timeout (which closes a connection idle that long), so
            // the gateway drops an idle connection before a part does, and never sends a
            // request on one the part is closing.
            .pool_idle_timeout(
                Duration::from_millis(settings.http.http_header_timeout_ms / 2)
                    .max(Duration::from_millis(100)),
            )
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the HTTP client")?;
        Ok(Registry {
            inner: Arc::new(Inner {
                pools,
                policy,
                partitions: settings.partitions,
                topic_prefix: settings.topic_prefix.clone(),
                client,
                counters: Counters::default(),
            }),
        })
    }

    pub fn pool(&self, upstream: Upstream) -> Option<&Pool> {
        self.inner.pools.get(&upstream)
    }

    /// One health round: resolve every pool, poll every instance's `/health/ready`.
    pub async fn check_health(&self) {
        let mut checks = tokio::task::JoinSet::new();
        for pool in self.inner.pools.values() {
            pool.resolve().await;
            for instance in pool.instances() {
                let client = self.inner.client.clone();
                let timeout = self
                    .inner
                    .policy
                    .health_interval
                    .clamp(Duration::from_millis(200), Duration::from_secs(2));
                checks.spawn(async move {
                    let url = format!("{}/health/ready", instance.base);
                    let answer = client.get(&url).timeout(timeout).send().await;
                    let (healthy, body) = match answer {
                        Ok(response) => {
                            let healthy = response.status() == StatusCode::OK;
                            (healthy, response.json::<ReadyBody>().await.ok())
                        }
                        Err(_) => (false, None),
                    };
                    if instance.healthy.swap(healthy, Ordering::Relaxed) != healthy {
                        tracing::info!(instance = %instance.base, healthy, "upstream health changed");
                    }
                    let owned = match body {
                        Some(body) => body
                            .services
                            .into_iter()
                            .map(|service| {
                                let partitions = service
                                    .partitions
                                    .into_iter()
                                    .filter(|p| !p.stepped_down && !p.fenced && !p.loading)
                                    .map(|p| p.partition)
                                    .collect();
                                (service.topic, partitions)
                            })
                            .collect(),
                        // An instance that does not answer owns nothing we can use.
                        None => HashMap::new(),
                    };
                    if let Ok(mut slot) = instance.owned.write() {
                        *slot = owned;
                    }
                });
            }
        }
        while checks.join_next().await.is_some() {}
    }

    async fn run_health_checks(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.inner.policy.health_interval) => {}
            }
            self.check_health().await;
        }
    }

    fn count(&self, upstream: Upstream, status: StatusCode) {
        if let Ok(mut requests) = self.inner.counters.requests.lock() {
            *requests
                .entry((upstream.name(), status.as_u16()))
                .or_default() += 1;
        }
    }

    /// Forwards one request; the answer is the upstream's, or a problem of the gateway's own.
    async fn forward(&self, request: Request) -> Result<Response, ApiError> {
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        let client_key = headers
            .get(IDEMPOTENCY_KEY)
            .and_then(|value| value.to_str().ok())
            .map(|key| key.trim().to_owned())
            .filter(|key| !key.is_empty());
        // A new order's id comes from its idempotency key: give it one, so the gateway knows
        // the owner of the order's partition (and may retry it safely).
        let generated_key = (parts.method == Method::POST
            && segments(parts.uri.path()) == ["orders"]
            && client_key.is_none())
        .then(|| format!("gw-{}", uuid::Uuid::now_v7()));
        if let Some(key) = &generated_key
            && let Ok(value) = HeaderValue::from_str(key)
        {
            headers.insert(IDEMPOTENCY_KEY, value);
        }
        let key = client_key.as_deref().or(generated_key.as_deref());
        // The caller the security layer authenticated, from which the order service derives a
        // new order's id as this does (the gateway forwards the same credentials).
        let actor = parts
            .extensions
            .get::<command_services::http::headers::Actor>()
            .map(|actor| actor.0.as_str());
        let route = route(&parts.method, parts.uri.path(), key, actor)
            .ok_or_else(|| ApiError::NotFound(format!("no route for {}", parts.uri.path())))?;
        let pool = self.pool(route.upstream).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no upstream {} is configured for {}",
                route.upstream.name(),
                parts.uri.path()
            ))
        })?;
        let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
            .await
            .map_err(|_| ApiError::PayloadTooLarge(MAX_BODY_BYTES))?;
        let idempotent = !route.command || key.is_some();
        let timeout = if route.command {
            self.inner.policy.command_timeout
        } else {
            self.inner.policy.read_timeout
        };
        let owner_of = route.aggregate.as_ref().map(|(kind, id)| {
            (
                format!("{}.{kind}.events", self.inner.topic_prefix),
                event_log::partition_for(id, self.inner.partitions),
            )
        });
        strip_hop_by_hop(&mut headers);

        let attempts = 1 + self.inner.policy.retries;
        let mut last_error = None;
        // The instances this request went to, by base URL.
        let mut tried: Vec<String> = Vec::new();
        for attempt in 0..attempts {
            let candidates = match pool.candidates(
                owner_of
                    .as_ref()
                    .map(|(topic, partition)| (topic.as_str(), *partition)),
            ) {
                Ok(candidates) => candidates,
                Err(error) => {
                    if matches!(error, ApiError::CircuitOpen(_)) {
                        self.inner
                            .counters
                            .breaker_rejections
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    // After a failed attempt, the attempt's own error says more.
                    return Err(last_error.unwrap_or(error));
                }
            };
            // The first candidate not tried yet for this request that takes it, else the first
            // tried one that does. Each call of `candidates` moves the round robin on, so a
            // turn counted from the attempt number could land on the same instance every time
            // (with two instances it did: the rotation and the turn cancelled out).
            let is_tried =
                |instance: &Arc<Instance>| tried.iter().any(|base: &String| *base == instance.base);
            let Some(instance) = candidates
                .iter()
                .filter(|instance| !is_tried(instance))
                .chain(candidates.iter().filter(|instance| is_tried(instance)))
                .find(|instance| instance.admit(&self.inner.policy))
                .cloned()
            else {
                self.inner
                    .counters
                    .breaker_rejections
                    .fetch_add(1, Ordering::Relaxed);
                return Err(last_error.unwrap_or_else(|| {
                    ApiError::CircuitOpen(format!(
                        "the circuit breaker of every instance of upstream {} is open: retry later",
                        route.upstream.name()
                    ))
                }));
            };
            if !tried.contains(&instance.base) {
                tried.push(instance.base.clone());
            }
            if attempt > 0 {
                self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            let url = format!("{}{}", instance.base, path_and_query);
            let sent = self
                .inner
                .client
                .request(parts.method.clone(), &url)
                .headers(headers.clone())
                .body(body.clone())
                .timeout(timeout)
                .send()
                .await;
            match sent {
                Ok(response)
                    if response
                        .headers()
                        .get(command_services::http::error::ROUTING)
                        .is_some_and(|value| value == "elsewhere") =>
                {
                    // "Not decided here": routing information, not a failure of the instance (it
                    // answered, which closes a half-open breaker). Nothing was done, so another
                    // instance may always be asked.
                    instance.record(true, &self.inner.policy);
                    if let Some((topic, partition)) = &owner_of {
                        instance.disown(topic, *partition);
                    }
                    if attempt + 1 < attempts {
                        tracing::info!(instance = %instance.base, attempt, "not the owner; asking another instance");
                        last_error = Some(ApiError::Unavailable(format!(
                            "no instance of upstream {} decides for this aggregate right now",
                            route.upstream.name()
                        )));
                        continue;
                    }
                    return forward(response, route.upstream.name()).await;
                }
                Ok(response) => {
                    let status = response.status();
                    let failed = matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    ) || status == StatusCode::INTERNAL_SERVER_ERROR;
                    instance.record(!failed, &self.inner.policy);
                    let retryable = failed && status != StatusCode::INTERNAL_SERVER_ERROR;
                    if retryable && idempotent && attempt + 1 < attempts {
                        tracing::info!(instance = %instance.base, %status, attempt, "retrying on another attempt");
                        last_error = Some(ApiError::Unavailable(format!(
                            "upstream {} answered {status}",
                            route.upstream.name()
                        )));
                        continue;
                    }
                    return forward(response, route.upstream.name()).await;
                }
                Err(error) => {
                    instance.record(false, &self.inner.policy);
                    let never_sent = error.is_connect();
                    let problem = if error.is_timeout() {
                        ApiError::GatewayTimeout(format!(
                            "upstream {} did not answer within {} ms",
                            route.upstream.name(),
                            timeout.as_millis()
                        ))
                    } else {
                        ApiError::BadGateway(format!(
                            "upstream {} could not be reached",
                            route.upstream.name()
                        ))
                    };
                    tracing::warn!(instance = %instance.base, %error, attempt, "upstream attempt failed");
                    if (idempotent || never_sent) && attempt + 1 < attempts {
                        last_error = Some(problem);
                        continue;
                    }
                    return Err(problem);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            ApiError::Unavailable(format!("upstream {} failed", route.upstream.name()))
        }))
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

async fn proxy(State(registry): State<Registry>, mut request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let correlation_id = request
        .headers()
        .get(CORRELATION_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.trim().is_empty() && value.len() <= 255)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        request.headers_mut().insert(CORRELATION_ID, value);
    }
    // Start a W3C trace here unless the client already did: its id travels with the command
    // into the events' `traceparent` header, the projections and the saga's commands.
    let trace_id = match request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(crate::telemetry::trace_id)
    {
        Some(trace_id) => trace_id.to_owned(),
        None => {
            let trace_id = uuid::Uuid::new_v4().simple().to_string();
            let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
            if let Ok(value) = HeaderValue::from_str(&format!("00-{trace_id}-{span_id}-01")) {
                request.headers_mut().insert("traceparent", value);
            }
            trace_id
        }
    };
    let upstream = route(&method, &path, Some(""), None).map(|route| route.upstream);
    let mut response = match registry.forward(request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if let Some(upstream) = upstream {
        registry.count(upstream, response.status());
    }
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        response.headers_mut().insert(CORRELATION_ID, value);
    }
    tracing::info!(
        %method,
        path,
        upstream = upstream.map(Upstream::name),
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        correlation_id,
        trace_id,
        "gateway request"
    );
    response
}

async fn live() -> Response {
    axum::Json(serde_json::json!({ "status": "live" })).into_response()
}

fn describe(registry: &Registry) -> (bool, serde_json::Value) {
    let mut ready = true;
    let mut upstreams = serde_json::Map::new();
    for upstream in Upstream::ALL {
        let Some(pool) = registry.pool(upstream) else {
            continue;
        };
        let instances: Vec<serde_json::Value> = pool
            .instances()
            .iter()
            .map(|instance| {
                serde_json::json!({
                    "base": instance.base,
                    "healthy": instance.healthy(),
                    "breaker": instance.breaker_state(),
                })
            })
            .collect();
        let healthy = pool
            .instances()
            .iter()
            .filter(|instance| instance.healthy())
            .count();
        ready &= healthy > 0;
        upstreams.insert(
            upstream.name().to_owned(),
            serde_json::json!({ "healthy": healthy, "instances": instances }),
        );
    }
    (ready, serde_json::Value::Object(upstreams))
}

/// 200 while every configured upstream has at least one healthy instance.
async fn ready(State(registry): State<Registry>) -> Response {
    let (ready, upstreams) = describe(&registry);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({
            "status": if ready { "ready" } else { "not_ready" },
            "upstreams": upstreams,
        })),
    )
        .into_response()
}

async fn metrics(State(registry): State<Registry>) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP platform_gateway_requests_total Requests the gateway answered, by upstream and status."
    );
    let _ = writeln!(out, "# TYPE platform_gateway_requests_total counter");
    if let Ok(requests) = registry.inner.counters.requests.lock() {
        let mut rows: Vec<_> = requests.iter().collect();
        rows.sort();
        for ((upstream, status), count) in rows {
            let _ = writeln!(
                out,
                "platform_gateway_requests_total{{upstream=\"{upstream}\",status=\"{status}\"}} {count}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP platform_gateway_retries_total Extra attempts made for idempotent requests."
    );
    let _ = writeln!(out, "# TYPE platform_gateway_retries_total counter");
    let _ = writeln!(
        out,
        "platform_gateway_retries_total {}",
        registry.inner.counters.retries.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP platform_gateway_breaker_rejections_total Requests refused because every instance's breaker was open."
    );
    let _ = writeln!(
        out,
        "# TYPE platform_gateway_breaker_rejections_total counter"
    );
    let _ = writeln!(
        out,
        "platform_gateway_breaker_rejections_total {}",
        registry
            .inner
            .counters
            .breaker_rejections
            .load(Ordering::Relaxed)
    );
    for (name, help) in [
        (
            "platform_gateway_upstream_healthy",
            "1 while the instance's /health/ready answers 200.",
        ),
        (
            "platform_gateway_breaker_open",
            "1 while the instance's circuit breaker is open or half-open.",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for upstream in Upstream::ALL {
            let Some(pool) = registry.pool(upstream) else {
                continue;
            };
            for instance in pool.instances() {
                let value = if name.ends_with("healthy") {
                    instance.healthy()
                } else {
                    instance.breaker_state() != "closed"
                };
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{}\",instance=\"{}\"}} {}",
                    upstream.name(),
                    instance.base,
                    u8::from(value)
                );
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The gateway's router (without the security layer).
pub fn app(registry: Registry) -> Router {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(proxy)
        .with_state(registry)
}

/// A built gateway: bound, registry filled, not yet serving.
#[derive(Debug)]
pub struct Gateway {
    listener: TcpListener,
    router: Router,
    registry: Registry,
    http: crate::settings::HttpSettings,
}

impl Gateway {
    /// Parses the upstreams, runs a first health round and binds the HTTP address.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let registry = Registry::new(settings)?;
        registry.check_health().await;
        let security = Arc::new(Security::from_settings(
            &settings.security,
            settings.distributed(),
        )?);
        let router = security::protect(app(registry.clone()), security);
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("binding {}", settings.http_addr))?;
        Ok(Gateway {
            listener,
            router,
            registry,
            http: settings.http.clone(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves until `signal` completes; health checks run meanwhile.
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(self.registry.clone().run_health_checks(stopped));
        tracing::info!(address = %self.listener.local_addr()?, "gateway serving HTTP");
        let served = crate::server::serve_http(self.listener, self.router, &self.http, signal)
            .await
            .context("serving HTTP");
        let _ = stop.send(true);
        served
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_route_to_their_aggregate_and_reads_to_the_query_api() {
        let id = "0192f5a4-1111-7000-8000-000000000001";
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(
            route(&post, &format!("/orders/{id}/cancel"), None, None),
            Some(Route {
                upstream: Upstream::Order,
                aggregate: Some(("order", id.to_owned())),
                command: true
            })
        );
        let placed = route(&post, "/orders", Some("k-1"), Some("key:alice")).expect("route");
        assert_eq!(
            placed.aggregate,
            Some((
                "order",
                command_services::http::headers::id_for_key("order-id", "k-1", Some("key:alice"))
                    .to_string()
            ))
        );
        assert_eq!(
            route(&post, "/inventory/SKU%2D1/receipts", None, None)
                .expect("route")
                .aggregate,
            Some(("stock", "SKU-1".to_owned()))
        );
        assert_eq!(
            route(&get, "/orders/x", None, None).map(|r| r.upstream),
            Some(Upstream::Query)
        );
        assert_eq!(
            route(&get, "/payments/x", None, None).map(|r| r.upstream),
            Some(Upstream::Query)
        );
        assert_eq!(
            route(&post, "/sagas/x/retry", None, None).map(|r| (r.upstream, r.command)),
            Some((Upstream::Saga, true))
        );
        assert_eq!(route(&get, "/nowhere", None, None), None);
        assert_eq!(route(&post, "/payments/x", None, None), None);
    }

    #[test]
    fn a_breaker_opens_after_the_failures_and_lets_one_probe_through_later() {
        let policy = Policy {
            command_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            retries: 0,
            health_interval: Duration::from_secs(1),
            breaker_failures: 2,
            breaker_open: Duration::from_millis(20),
        };
        let instance = Instance::new("http://x".into());
        instance.record(false, &policy);
        assert!(instance.admit(&policy), "one failure keeps it closed");
        instance.record(false, &policy);
        assert!(!instance.available() && !instance.admit(&policy), "open");
        std::thread::sleep(Duration::from_millis(25));
        assert!(instance.available());
        assert!(instance.admit(&policy), "the probe");
        assert!(!instance.admit(&policy), "only one probe at a time");
        instance.record(false, &policy);
        assert_eq!(
            instance.breaker_state(),
            "open",
            "a failed probe opens it again"
        );
        std::thread::sleep(Duration::from_millis(25));
        assert!(instance.admit(&policy), "the next probe");
        instance.record(true, &policy);
        assert_eq!(instance.breaker_state(), "closed");
    }
}
