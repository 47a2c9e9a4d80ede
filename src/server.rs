//! Building and running the platform's process: the parts it runs and one HTTP server for all
//! of their routes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use command_services::provider::TestProvider;
use command_services::{CommandSettings, CommandState, ServiceSet};
use http_edge::{ApiError, MAX_BODY_BYTES};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use utoipa::OpenApi;

use projections::read_side::{ProjectionStatus, StatusError};
use projections::{ReadBackend, ReadSide};
use saga_orchestrator::side::SagaSide;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::settings::{HttpSettings, Part, Settings};
use http_edge::security::{self, Security};
use http_edge::serve::serve_http;
use supervisor::Supervisor;

/// How long a graceful stop waits for the command services' last snapshots.
const FINAL_SNAPSHOTS: Duration = Duration::from_secs(10);
/// How long a graceful stop waits for the parts' tasks to end once told to.
const TASKS_STOP: Duration = Duration::from_secs(5);

/// A built platform process: bound, parts started, not yet serving HTTP.
pub struct Platform {
    listener: TcpListener,
    router: Router,
    /// What this process serves, one line per part, for the start-up log.
    parts: Vec<String>,
    /// Where it keeps its data, for the start-up log.
    storage: String,
    http: HttpSettings,
    shutdown: watch::Sender<bool>,
    supervisor: Supervisor,
    commands: CommandState,
    read: Option<ReadSide>,
    saga: Option<SagaSide>,
    backend: Backend,
    /// Held while the process serves an embedded data directory.
    _data_dir: Option<crate::backend::DataDirLock>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("address", &self.listener.local_addr().ok())
            .field("backend", &self.backend)
            .finish()
    }
}

#[derive(Clone)]
struct AppState {
    commands: CommandState,
    read: Option<ReadSide>,
    saga: Option<SagaSide>,
    /// The console, when this process runs the projections or the saga: it shows the
    /// orchestrator's saga store, or one opened for the console alone.
    console: Option<console::Console>,
    backend: &'static str,
    max_lag_seconds: f64,
    /// The projections' lag, which `/health/ready` and `/metrics` show: measuring it asks the
    /// log where every partition ends and reads the oldest unapplied records.
    projection_status: Arc<Cached<Result<Vec<ProjectionStatus>, StatusError>>>,
    /// The sagas by state, which `/metrics` shows: a count over the whole saga table.
    saga_counts: Arc<Cached<Vec<(String, i64)>>>,
    /// The parts' long-running tasks; one that died makes this process not ready.
    supervisor: Supervisor,
}

/// How long a measured status answers `/health/ready` and `/metrics` before it is measured
/// again. Both routes are open (probes and scrapers carry no credentials) and unlimited, so
/// whatever their rate, the log and the databases see at most one measurement per this long.
const STATUS_TTL: Duration = Duration::from_millis(500);

/// A value measured by one request at a time and kept for [`STATUS_TTL`]: requests that come
/// meanwhile get it (those that come while it is measured wait for that measurement).
struct Cached<T> {
    slot: tokio::sync::Mutex<Option<(tokio::time::Instant, T)>>,
}

impl<T> Default for Cached<T> {
    fn default() -> Self {
        Cached {
            slot: tokio::sync::Mutex::new(None),
        }
    }
}

impl<T: Clone> Cached<T> {
    async fn get(&self, measure: impl Future<Output = T>) -> T {
        let mut slot = self.slot.lock().await;
        if let Some((at, value)) = &*slot
            && at.elapsed() < STATUS_TTL
        {
            return value.clone();
        }
        let value = measure.await;
        *slot = Some((tokio::time::Instant::now(), value.clone()));
        value
    }
}

/// Creates the platform's topics that do not exist yet, whichever part starts first: a consumer
/// group subscribed to a topic that does not exist would only see it at its next metadata
/// refresh (minutes), and a topic created by a first produce gets the broker's default partition
/// count instead of `--partitions`.
async fn ensure_topics(log: &event_log::SharedLog, settings: &Settings) -> Result<()> {
    for (service, aggregate) in [
        ("order", "order"),
        ("payment", "payment"),
        ("inventory", "stock"),
        ("customer", "customer"),
    ] {
        for topic in [
            event_log::topics::events(&settings.store.topic_prefix, aggregate),
            event_log::topics::commands(&settings.store.topic_prefix, service),
        ] {
            log.ensure_topic(&topic, settings.partitions)
                .await
                .map_err(Error::log(format!("creating topic {topic}")))?;
        }
    }
    Ok(())
}

impl Platform {
    /// Opens the backend, starts the parts named by `part`, and binds the HTTP address.
    pub async fn build(settings: Settings, part: Part) -> Result<Self> {
        Self::build_with(settings, part, |log| log).await
    }

    /// [`Platform::build`], every part using the event log as `layer` wraps it: a decorator
    /// that sees each call (`platform-bench` times appends with one).
    pub async fn build_with(
        settings: Settings,
        part: Part,
        layer: impl FnOnce(event_log::SharedLog) -> event_log::SharedLog,
    ) -> Result<Self> {
        if part == Part::Gateway {
            return Err(Error::Refused(
                "the gateway is its own process: gateway::Gateway::build".into(),
            ));
        }
        let security = Arc::new(Security::from_settings(
            &settings.security,
            settings.store.distributed(),
        )?);
        // Before anything is opened: a second process on the directory changes nothing.
        let data_dir = if settings.store.kafka.is_none() {
            Some(crate::backend::DataDirLock::acquire(
                &settings.store.data_dir,
            )?)
        } else {
            None
        };
        let mut backend = Backend::open(&settings).await?;
        backend.log = layer(backend.log);
        ensure_topics(&backend.log, &settings).await?;
        let (shutdown, stopped) = watch::channel(false);
        let supervisor = Supervisor::new();
        let services = match part {
            Part::All | Part::Commands => ServiceSet::ALL,
            Part::Order => ServiceSet {
                order: true,
                ..ServiceSet::NONE
            },
            Part::Payment => ServiceSet {
                payment: true,
                ..ServiceSet::NONE
            },
            Part::Inventory => ServiceSet {
                inventory: true,
                ..ServiceSet::NONE
            },
            Part::Customer => ServiceSet {
                customer: true,
                ..ServiceSet::NONE
            },
            Part::Projections | Part::Saga | Part::Gateway => ServiceSet::NONE,
        };
        let mut command_settings = CommandSettings::new(settings.store.topic_prefix.clone());
        command_settings.partitions = settings.partitions;
        command_settings.services = services;
        command_settings.assignment = settings.assignment.into();
        command_settings.instance = settings.instance;
        command_settings.instances = settings.instances;
        if settings.instances > 1
            && command_settings.assignment == command_services::services::Assignment::Group
        {
            return Err(Error::Refused(format!(
                "--instances {} needs --assignment static; with --assignment group (the default) \
                 the instances share the partitions by consumer group, no count to give",
                settings.instances
            )));
        }
        command_settings.snapshot_every = settings.snapshot_every;
        command_settings.idempotency_window = Duration::from_secs(settings.idempotency_window_secs);
        let commands = CommandState::start(
            backend.log.clone(),
            backend.command_store.clone(),
            &command_settings,
            Arc::new(TestProvider),
            backend.keys.clone(),
            stopped,
            &supervisor,
        )
        .await?;
        let read_backend = match &settings.store.database_url {
            Some(url) => ReadBackend::Postgres {
                url: url.clone(),
                schema_prefix: settings.store.schema_prefix.clone(),
            },
            None => ReadBackend::Sqlite {
                dir: settings.store.data_dir.clone(),
            },
        };
        let saga = if matches!(part, Part::All | Part::Saga) {
            let saga = SagaSide::open(
                backend.log.clone(),
                &read_backend,
                &settings.store.topic_prefix,
                settings.saga_config(),
            )
            .await
            .map_err(Error::db("opening the saga orchestrator's database"))?;
            saga.start(shutdown.subscribe(), &supervisor);
            Some(saga)
        } else {
            None
        };
        let read = if matches!(part, Part::All | Part::Projections) {
            let read = ReadSide::open(
                backend.log.clone(),
                &read_backend,
                &settings.store.topic_prefix,
            )
            .await
            .map_err(Error::db("opening the read models"))?
            .with_keys(backend.keys.clone());
            read.start_workers(shutdown.subscribe(), &supervisor);
            Some(read)
        } else {
            None
        };
        // The projections part's console shows the sagas too, so that one console (the query
        // API's, behind the gateway) covers the platform: it reads the orchestrator's store and
        // records an operator's retry there, as `platform sagas retry` does; the orchestrator
        // sends the commands.
        let console_saga = match (&saga, &read) {
            (Some(saga), _) => Some(saga.clone()),
            (None, Some(_)) => Some(
                SagaSide::open(
                    backend.log.clone(),
                    &read_backend,
                    &settings.store.topic_prefix,
                    settings.saga_config(),
                )
                .await
                .map_err(Error::db(
                    "opening the saga orchestrator's database for the console",
                ))?,
            ),
            (None, None) => None,
        };
        let console = (read.is_some() || console_saga.is_some()).then(|| {
            let console = console::Console::new(read.clone(), console_saga);
            console.start(shutdown.subscribe(), &supervisor);
            console
        });
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .map_err(Error::io(format!("binding {}", settings.http_addr)))?;
        let router = security::protect(
            app(AppState {
                commands: commands.clone(),
                read: read.clone(),
                saga: saga.clone(),
                console,
                backend: backend.log.backend(),
                max_lag_seconds: settings.max_lag_seconds,
                projection_status: Arc::default(),
                saga_counts: Arc::default(),
                supervisor: supervisor.clone(),
            }),
            security,
        );
        let mut parts = Vec::new();
        let names: Vec<&str> = [
            ("order", services.order),
            ("payment", services.payment),
            ("inventory", services.inventory),
            ("customer", services.customer),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        if !names.is_empty() {
            parts.push(format!(
                "command services {} (POST /orders, /inventory/{{sku}}/receipts, /customers, ...)",
                names.join(", ")
            ));
        }
        if read.is_some() {
            parts.push(
                "read models orders, inventory, payments, customers, audit (GET /orders, /inventory, /payments, /customers, /audit)"
                    .to_owned(),
            );
        }
        if saga.is_some() {
            parts.push("saga orchestrator (GET /sagas)".to_owned());
        }
        let storage = match (&settings.store.kafka, &settings.store.database_url) {
            (Some(brokers), _) => format!("Kafka at {brokers}, Postgres"),
            (None, Some(_)) => format!(
                "embedded log in {}, Postgres",
                settings.store.data_dir.display()
            ),
            (None, None) => format!(
                "embedded log and SQLite stores in {}",
                settings.store.data_dir.display()
            ),
        };
        Ok(Platform {
            listener,
            router,
            parts,
            storage,
            http: settings.http.clone(),
            shutdown,
            supervisor,
            commands,
            read,
            saga,
            backend,
            _data_dir: data_dir,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The parts' long-running tasks (for tests and tools: which run, which died).
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The running command services (for tests and tools).
    pub fn commands(&self) -> &CommandState {
        &self.commands
    }

    /// The saga orchestrator of this process, when it runs it.
    pub fn saga(&self) -> Option<&SagaSide> {
        self.saga.as_ref()
    }

    /// The read models of this process, when it runs them.
    pub fn read_side(&self) -> Option<&ReadSide> {
        self.read.as_ref()
    }

    /// Serves HTTP until `signal` completes, then stops the parts (the owners save their snapshots).
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let Platform {
            listener,
            router,
            shutdown,
            supervisor,
            commands,
            http,
            parts,
            storage,
            read,
            saga,
            ..
        } = self;
        let console = read.is_some() || saga.is_some();
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .map_err(Error::io("reading the bound address"))?
        );
        for part in &parts {
            tracing::info!("{url}: {part}");
        }
        let console = if console {
            format!(", console {url}/console")
        } else {
            String::new()
        };
        tracing::info!(
            "serving HTTP at {url} (readiness {url}/health/ready, API {url}/openapi.json{console}); data: {storage}"
        );
        serve_http(listener, router, &http, signal)
            .await
            .map_err(Error::io("serving HTTP"))?;
        // From here a task that ends is stopping, not dying.
        supervisor.stop();
        let _ = shutdown.send(true);
        // The owners write their last snapshots, so the next start-up reads little of the log;
        // a database that does not answer only makes that start-up longer.
        if tokio::time::timeout(FINAL_SNAPSHOTS, commands.snapshots_written())
            .await
            .is_err()
        {
            tracing::warn!(
                "the last snapshots were not written within {FINAL_SNAPSHOTS:?}; the next start-up reads more of the log"
            );
        }
        // Every worker finishes what it holds (a projection's batch, the relay's publishes);
        // what is left after the bound is redone from the stored positions at the next start.
        let left = supervisor.wait(TASKS_STOP).await;
        if !left.is_empty() {
            tracing::warn!(
                tasks = ?left,
                "tasks still running {TASKS_STOP:?} after the stop; their work is redone from the stored positions at the next start"
            );
        }
        Ok(())
    }
}

/// The whole HTTP API of this process.
fn app(state: AppState) -> Router {
    let command_routes = command_services::http::commands::router(&state.commands)
        .with_state(state.commands.clone());
    let customer_routes = command_services::http::customers::router(&state.commands)
        .with_state(state.commands.clone());
    let mut router = Router::new().merge(command_routes).merge(customer_routes);
    if let Some(read) = &state.read {
        router = router.merge(projections::query::router().with_state(read.clone()));
        router = router.merge(projections::audit::router().with_state(read.clone()));
    }
    if let Some(saga) = &state.saga {
        router = router.merge(saga_orchestrator::http::router().with_state(saga.clone()));
    }
    if let Some(console) = &state.console {
        router = router.merge(console::router(console.clone()));
    }
    // Probes and scrapers carry no credentials: open, cheap (cached statuses) and bounded by
    // the server's connection cap.
    let open = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi));
    let router = router
        .merge(security::routes(open, security::RouteClass::Open))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    http_edge::headers::correlation_ids(crate::telemetry::instrument(router))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("a handler panicked".into()).into_response()
}

async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "live" }))
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    backend: &'static str,
    services: Vec<command_services::owner::OwnerStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    projections: Option<Vec<ProjectionStatus>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<String>,
}

/// 200 once every part of this process has caught up with the log (command services rebuilt,
/// projections within the lag threshold); 503 before, saying why.
async fn ready(State(state): State<AppState>) -> Response {
    let mut problems = state.supervisor.failures();
    if !state.commands.ready() {
        let named: Vec<String> = state
            .commands
            .statuses()
            .into_iter()
            .flat_map(|status| status.problems)
            .collect();
        if named.is_empty() {
            problems.push("command services are still rebuilding their state".to_owned());
        }
        problems.extend(named);
    }
    if let Some(saga) = &state.saga {
        problems.extend(saga.problems());
    }
    let projections = match &state.read {
        None => None,
        Some(read) => match state.projection_status.get(read.status()).await {
            Ok(statuses) => {
                for status in &statuses {
                    problems.extend(status.problems.iter().cloned());
                    if status.lag_seconds > state.max_lag_seconds {
                        problems.push(format!(
                            "projection {} lags {:.1} s (threshold {} s)",
                            status.projection, status.lag_seconds, state.max_lag_seconds
                        ));
                    }
                }
                Some(statuses)
            }
            Err(error) => {
                problems.push(format!("cannot measure projection lag: {error}"));
                None
            }
        },
    };
    let ready = problems.is_empty();
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        backend: state.backend,
        services: state.commands.statuses(),
        projections,
        problems,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus text exposition of what this process knows about itself: the process's counters
/// and histograms ([`crate::telemetry::register`]) and what is measured at the scrape (the
/// command services' and projections' statuses, the sagas by state), set into a registry of
/// this scrape.
async fn metrics(State(state): State<AppState>) -> Response {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::AtomicU64;

    type Labels<const N: usize> = [(&'static str, String); N];
    let mut registry = prometheus_client::registry::Registry::default();
    crate::telemetry::register(&mut registry);
    let conflicts = Family::<Labels<1>, Counter>::default();
    for status in state.commands.statuses() {
        conflicts
            .get_or_create(&[("topic", status.topic)])
            .inc_by(status.conflicts);
    }
    registry.register(
        "platform_command_conflicts",
        "Records skipped by the effective-history rule on the command side",
        conflicts,
    );
    if let Some(read) = &state.read
        && let Ok(statuses) = state.projection_status.get(read.status()).await
    {
        let lag_events = Family::<Labels<3>, Gauge>::default();
        let lag_seconds = Family::<Labels<3>, Gauge<f64, AtomicU64>>::default();
        let parked = Family::<Labels<1>, Gauge>::default();
        let conflicts = Family::<Labels<1>, Counter>::default();
        for status in statuses {
            for lag in status.partitions {
                let labels = [
                    ("projection", status.projection.clone()),
                    ("topic", lag.topic),
                    ("partition", lag.partition.to_string()),
                ];
                lag_events
                    .get_or_create(&labels)
                    .set(i64::try_from(lag.lag_events).unwrap_or(i64::MAX));
                lag_seconds.get_or_create(&labels).set(lag.lag_seconds);
            }
            let labels = [("projection", status.projection)];
            parked
                .get_or_create(&labels)
                .set(i64::try_from(status.parked).unwrap_or(i64::MAX));
            conflicts.get_or_create(&labels).inc_by(status.conflicts);
        }
        registry.register(
            "platform_projection_lag_events",
            "Records not yet applied by a projection, per partition",
            lag_events,
        );
        registry.register(
            "platform_projection_lag_seconds",
            "Age of the oldest record not yet applied, per partition",
            lag_seconds,
        );
        registry.register(
            "platform_projection_parked_events",
            "Events parked by a projection, waiting for an operator",
            parked,
        );
        registry.register(
            "platform_projection_conflicts",
            "Records skipped by the effective-history rule in a projection",
            conflicts,
        );
    }
    if let Some(saga) = &state.saga {
        let instances = Family::<Labels<1>, Gauge>::default();
        let counts = state
            .saga_counts
            .get(crate::telemetry::saga_instances(saga))
            .await;
        for (saga_state, count) in counts {
            instances.get_or_create(&[("state", saga_state)]).set(count);
        }
        registry.register(
            "platform_saga_instances",
            "Saga instances by state (needs_attention: parked for an operator)",
            instances,
        );
    }
    let mut out = String::new();
    if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        return ApiError::Internal(format!("cannot encode the metrics: {error}")).into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        out,
    )
        .into_response()
}

/// The answers the HTTP edge may give on every route before (or instead of) the route's own:
/// authentication, roles and rates (`http_edge::security`), request limits, and the request
/// deadline (`http_edge::serve`). Added to every operation of the document that does not say
/// them itself.
struct EdgeAnswers;

impl utoipa::Modify for EdgeAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let answers = [
            ("401", "No or bad credentials (with authentication on)"),
            ("403", "The caller's role may not use this route"),
            ("414", "Request target longer than 4096 bytes"),
            ("429", "Over the caller's rate: see Retry-After"),
            ("431", "Request headers larger than 16 KiB"),
            (
                "503",
                "Not answered within the request timeout, or the part is not ready",
            ),
        ];
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                for (status, description) in answers {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| {
                            ResponseBuilder::new()
                                .description(description)
                                .content(
                                    http_edge::PROBLEM_JSON,
                                    ContentBuilder::new()
                                        .schema(Some(Ref::from_schema_name("Problem")))
                                        .build(),
                                )
                                .build()
                                .into()
                        });
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Order fulfilment platform",
        description = "Commands (orders, inventory, customers) over an event log; errors are RFC 9457 problem+json."
    ),
    paths(
        command_services::http::commands::receive_stock,
        command_services::http::commands::adjust_stock,
        command_services::http::commands::place_order,
        command_services::http::commands::cancel_order,
        command_services::http::commands::ship_order,
        command_services::http::customers::register_customer,
        command_services::http::customers::change_customer,
        command_services::http::customers::erase_customer,
        projections::query::get_order,
        projections::query::list_orders,
        projections::query::get_stock,
        projections::query::low_stock,
        projections::query::get_payment,
        projections::query::get_customer,
        projections::audit::get_timeline,
        projections::audit::get_trace,
        projections::audit::get_state,
        saga_orchestrator::http::get_saga,
        saga_orchestrator::http::list_sagas,
        saga_orchestrator::http::retry_saga,
    ),
    components(schemas(projections::audit::AuditedType)),
    modifiers(&EdgeAnswers),
    tags(
        (name = "orders", description = "The order's life cycle"),
        (name = "customers", description = "Customers; their personal fields are stored only encrypted with a key of their own, which erasure deletes"),
        (name = "inventory", description = "Stock on hand per SKU"),
        (name = "payments", description = "The payment of each order"),
        (name = "audit", description = "Who did what, when and why: timelines, causation trees, past states"),
        (name = "sagas", description = "The fulfilment saga of each order"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

async fn openapi() -> Response {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    Json(doc).into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// However many requests ask at once, the status is measured once per [`STATUS_TTL`].
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_status_is_measured_once_per_ttl_whatever_the_request_rate() {
        let cached: Arc<Cached<usize>> = Arc::default();
        let measured = Arc::new(AtomicUsize::new(0));
        let ask = || {
            let (cached, measured) = (cached.clone(), measured.clone());
            tokio::spawn(async move {
                cached
                    .get(async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        measured.fetch_add(1, Ordering::SeqCst) + 1
                    })
                    .await
            })
        };
        let first: Vec<_> = (0..100).map(|_| ask()).collect();
        for answer in first {
            assert_eq!(answer.await.expect("task"), 1);
        }
        tokio::time::sleep(STATUS_TTL / 2).await;
        assert_eq!(
            ask().await.expect("task"),
            1,
            "within the TTL: the same answer"
        );
        tokio::time::sleep(STATUS_TTL).await;
        assert_eq!(ask().await.expect("task"), 2, "after it: measured again");
        assert_eq!(measured.load(Ordering::SeqCst), 2);
    }
}
