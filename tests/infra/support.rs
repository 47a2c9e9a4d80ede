//! Starting platforms, gateways and stand-in upstreams for these tests.

use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use gateway::Gateway;
use platform::{Part, Platform, Settings};
use tokio::sync::oneshot;
use tracing_subscriber::Layer;

/// Installs this test binary's subscriber once: the span collector, and log output when
/// `TEST_LOG` is set.
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use tracing_subscriber::layer::SubscriberExt;
        let fmt = std::env::var("TEST_LOG").is_ok().then(|| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::EnvFilter::new(
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
                ))
        });
        let subscriber = tracing_subscriber::registry().with(SpanCollector).with(fmt);
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

/// A span seen by [`SpanCollector`]: its name and fields.
#[derive(Debug, Clone)]
pub struct SeenSpan {
    pub name: &'static str,
    pub fields: std::collections::BTreeMap<String, String>,
}

/// Every span with a `trace_id` field opened in this process, for the tests to look at.
pub fn spans() -> Vec<SeenSpan> {
    SPANS.lock().map(|spans| spans.clone()).unwrap_or_default()
}

static SPANS: std::sync::Mutex<Vec<SeenSpan>> = std::sync::Mutex::new(Vec::new());

/// An in-memory span collector: records the fields of every span that carries a trace id.
struct SpanCollector;

struct Fields(std::collections::BTreeMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanCollector {
    fn on_new_span(
        &self,
        attributes: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Fields(std::collections::BTreeMap::new());
        attributes.record(&mut fields);
        if fields.0.get("trace_id").is_some_and(|id| !id.is_empty())
            && let Ok(mut spans) = SPANS.lock()
        {
            spans.push(SeenSpan {
                name: attributes.metadata().name(),
                fields: fields.0,
            });
        }
    }
}

/// Embedded settings in `dir` with a unique topic prefix and 4 partitions.
pub fn settings(dir: &std::path::Path) -> Settings {
    let mut settings = Settings::embedded(dir);
    settings.partitions = 4;
    settings.saga.timeout_ms = 120_000;
    settings
}

/// A server running in this process until stopped.
pub struct Running {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops serving (the port closes) and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts `part` with `settings` and waits until its command services are ready.
pub async fn platform(settings: Settings, part: Part) -> Running {
    init_logging();
    let platform = Platform::build(settings, part)
        .await
        .expect("build the platform");
    assert!(
        platform
            .commands()
            .wait_ready(Duration::from_secs(60))
            .await,
        "the platform did not become ready"
    );
    let address = platform.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        platform
            .run_until_stopped(async move {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    Running {
        address,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Starts a gateway with `settings`.
pub async fn gateway(settings: Settings) -> Running {
    init_logging();
    let gateway = Gateway::build(&settings.gateway_config())
        .await
        .expect("build the gateway");
    let address = gateway.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        gateway
            .run_until_stopped(async move {
                let _ = stopped.await;
            })
            .await
            .expect("serve the gateway");
    });
    Running {
        address,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Serves `router` on `address` (port 0 for a free one).
pub async fn serve(router: axum::Router, address: SocketAddr) -> Running {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .expect("bind the stand-in upstream");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    Running {
        address,
        stop: Some(stop),
        task: Some(task),
    }
}

pub fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Status and JSON body of a response.
pub async fn read(
    response: reqwest::Response,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, headers, body)
}

/// The value of the cookie `name` that an answer sets, if it sets one.
pub fn set_cookie(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(|value| value.strip_prefix(&format!("{name}=")))
        .and_then(|value| value.split(';').next())
        .map(str::to_owned)
}
