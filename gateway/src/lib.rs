//! The API gateway (`platform serve gateway`): the single entry point for clients.
//!
//! It routes each request to an upstream (the order, inventory or customer command service, the
//! query API, the saga API), picks a healthy instance, and forwards the request over HTTP.
//!
//! - **Registry**: each upstream's instances come from `--gateway-<upstream>`: base URLs and/or
//!   `dns://name:port`, re-resolved at every health round. A background task polls every
//!   instance's `/health/ready`; an instance is healthy while that answers 200. Its body also
//!   says which partitions of which topic the instance owns, which is how commands find their
//!   owner.
//! - **Partition routing**: a command names its aggregate (`/orders/{id}/...`,
//!   `/inventory/{sku}/...`, `/customers/{id}...`; `POST /orders` and `POST /customers` derive
//!   the new aggregate's id from its `Idempotency-Key`, which the gateway adds when the client
//!   sent none). The gateway hashes it
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
//!   absent or unusable, by `http_edge::headers::correlation_ids`, and passed upstream and back).
//!
//! # Modules
//! - [`routing`]: which upstream serves a request, and which aggregate's owner takes a command;
//! - [`registry`]: the upstreams' instances, their health and the partitions they own;
//! - [`breaker`]: each instance's circuit breaker;
//! - [`proxy`]: forwarding, retries, timeouts, hop-by-hop headers.

pub mod breaker;
pub mod proxy;
pub mod registry;
pub mod routing;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_edge::security::{self, Security, SecuritySettings};
use http_edge::serve::HttpSettings;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use registry::{Instance, Policy, Pool, Registry};
pub use routing::{Route, Upstream, route};

/// Everything the gateway is built from (`platform serve gateway`'s settings).
#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub topic_prefix: String,
    pub partitions: u32,
    /// Whether the platform runs on Kafka and Postgres: decides the default of `--auth`.
    pub distributed: bool,
    pub gateway: GatewaySettings,
    pub security: SecuritySettings,
    pub http: HttpSettings,
}

/// Why the gateway cannot start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An upstream setting that names no instance.
    #[error("{0}")]
    Upstream(String),
    #[error(transparent)]
    Security(#[from] security::InvalidSettings),
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("building the gateway's HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
}

/// The gateway's upstreams and policies (`platform serve gateway`).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewaySettings {
    /// Instances of the order service: `http://host:port` base URLs, comma separated, and/or
    /// `dns://name:port` (every address the name resolves to, re-resolved at each health
    /// check).
    #[arg(long, env = "PLATFORM_GATEWAY_ORDER", value_delimiter = ',')]
    pub gateway_order: Vec<String>,

    /// Instances of the inventory service (same form as --gateway-order).
    #[arg(long, env = "PLATFORM_GATEWAY_INVENTORY", value_delimiter = ',')]
    pub gateway_inventory: Vec<String>,

    /// Instances of the customer service (same form as --gateway-order).
    #[arg(long, env = "PLATFORM_GATEWAY_CUSTOMER", value_delimiter = ',')]
    pub gateway_customer: Vec<String>,

    /// Instances of the query API (`serve projections`), same form.
    #[arg(long, env = "PLATFORM_GATEWAY_QUERY", value_delimiter = ',')]
    pub gateway_query: Vec<String>,

    /// Instances of the saga API (`serve saga`), same form.
    #[arg(long, env = "PLATFORM_GATEWAY_SAGA", value_delimiter = ',')]
    pub gateway_saga: Vec<String>,

    /// Timeout of one attempt at a command (ms).
    #[arg(
        long,
        env = "PLATFORM_GATEWAY_COMMAND_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub gateway_command_timeout_ms: u64,

    /// Timeout of one attempt at a read (ms); a read-your-writes query waits up to 5 s.
    #[arg(
        long,
        env = "PLATFORM_GATEWAY_READ_TIMEOUT_MS",
        default_value_t = 8_000
    )]
    pub gateway_read_timeout_ms: u64,

    /// Extra attempts, on another instance, for an idempotent request (a GET, or a command with
    /// an Idempotency-Key) that failed to connect, timed out or answered 502/503/504.
    #[arg(long, env = "PLATFORM_GATEWAY_RETRIES", default_value_t = 2)]
    pub gateway_retries: u32,

    /// How often each upstream instance's /health/ready is polled (ms).
    #[arg(
        long,
        env = "PLATFORM_GATEWAY_HEALTH_INTERVAL_MS",
        default_value_t = 2_000
    )]
    pub gateway_health_interval_ms: u64,

    /// Consecutive failures that open an instance's circuit breaker.
    #[arg(long, env = "PLATFORM_GATEWAY_BREAKER_FAILURES", default_value_t = 5)]
    pub gateway_breaker_failures: u32,

    /// How long an open breaker refuses requests before letting one probe through (ms).
    #[arg(
        long,
        env = "PLATFORM_GATEWAY_BREAKER_OPEN_MS",
        default_value_t = 10_000
    )]
    pub gateway_breaker_open_ms: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        http_edge::flag_defaults()
    }
}

pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";

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

/// The gateway's counters, and each instance's health and breaker as they are at the scrape.
async fn metrics(State(registry): State<Registry>) -> Response {
    use prometheus_client::encoding::prometheus_text;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;

    let counters = &registry.inner.counters;
    let mut metrics = prometheus_client::registry::Registry::default();
    metrics.register(
        "platform_gateway_requests",
        "Requests the gateway answered, by upstream and status",
        counters.requests.clone(),
    );
    metrics.register(
        "platform_gateway_retries",
        "Extra attempts made for idempotent requests",
        counters.retries.clone(),
    );
    metrics.register(
        "platform_gateway_breaker_rejections",
        "Requests refused because every instance's breaker was open",
        counters.breaker_rejections.clone(),
    );
    let healthy = Family::<[(&'static str, String); 2], Gauge>::default();
    let breaker_open = Family::<[(&'static str, String); 2], Gauge>::default();
    for upstream in Upstream::ALL {
        let Some(pool) = registry.pool(upstream) else {
            continue;
        };
        for instance in pool.instances() {
            let labels = [
                ("upstream", upstream.name().to_owned()),
                ("instance", instance.base.clone()),
            ];
            healthy
                .get_or_create(&labels)
                .set(i64::from(instance.healthy()));
            breaker_open
                .get_or_create(&labels)
                .set(i64::from(instance.breaker_state() != "closed"));
        }
    }
    metrics.register(
        "platform_gateway_upstream_healthy",
        "1 while the instance's /health/ready answers 200",
        healthy,
    );
    metrics.register(
        "platform_gateway_breaker_open",
        "1 while the instance's circuit breaker is open or half-open",
        breaker_open,
    );
    let mut out = String::new();
    if let Err(error) = prometheus_text::encode(&mut out, &metrics) {
        return http_edge::ApiError::Internal(format!("cannot encode the metrics: {error}"))
            .into_response();
    }
    ([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], out).into_response()
}

pub fn app(registry: Registry) -> Router {
    let open = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics));
    http_edge::headers::correlation_ids(
        security::routes(open, security::RouteClass::Open).fallback(proxy::proxy),
    )
    .with_state(registry)
}

/// A built gateway: bound, registry filled, not yet serving.
#[derive(Debug)]
pub struct Gateway {
    listener: TcpListener,
    router: Router,
    registry: Registry,
    http: HttpSettings,
}

impl Gateway {
    /// Parses the upstreams, runs a first health round and binds the HTTP address.
    pub async fn build(config: &Config) -> Result<Self, Error> {
        let registry = Registry::new(config)?;
        registry.check_health().await;
        let security = Arc::new(Security::from_settings(
            &config.security,
            config.distributed,
        )?);
        let router = security::protect(app(registry.clone()), security);
        let listener = TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.http_addr,
                source,
            })?;
        Ok(Gateway {
            listener,
            router,
            registry,
            http: config.http.clone(),
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
    ) -> Result<(), Error> {
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(self.registry.clone().run_health_checks(stopped));
        tracing::info!(address = %self.local_addr(), "gateway serving HTTP");
        let served = http_edge::serve::serve_http(self.listener, self.router, &self.http, signal)
            .await
            .map_err(Error::Serve);
        let _ = stop.send(true);
        served
    }
}
