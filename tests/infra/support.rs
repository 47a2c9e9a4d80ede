//! Starting platforms, gateways and stand-in upstreams for these tests.

use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use platform::gateway::Gateway;
use platform::{Part, Platform, Settings};
use tokio::sync::oneshot;

pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
                ))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Embedded settings in `dir` with a unique topic prefix and 4 partitions.
pub fn settings(dir: &std::path::Path) -> Settings {
    let mut settings = Settings::embedded(dir);
    settings.partitions = 4;
    settings.saga_timeout_ms = 120_000;
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
    let gateway = Gateway::build(&settings).await.expect("build the gateway");
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
