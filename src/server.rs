//! Building and running the platform's process: the parts it runs and one HTTP server for all
//! of their routes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use command_services::http::{ApiError, MAX_BODY_BYTES};
use command_services::provider::TestProvider;
use command_services::{CommandSettings, CommandState, ServiceSet};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use utoipa::OpenApi;

use crate::backend::Backend;
use crate::settings::{Part, Settings};

/// A built platform process: bound, parts started, not yet serving HTTP.
pub struct Platform {
    listener: TcpListener,
    router: Router,
    shutdown: watch::Sender<bool>,
    commands: CommandState,
    backend: Backend,
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
    backend: &'static str,
}

impl Platform {
    /// Opens the backend, starts the parts named by `part`, and binds the HTTP address.
    pub async fn build(settings: Settings, part: Part) -> anyhow::Result<Self> {
        let backend = Backend::open(&settings).await?;
        let (shutdown, stopped) = watch::channel(false);
        let services = match part {
            Part::All => ServiceSet::ALL,
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
        };
        let mut command_settings = CommandSettings::new(settings.topic_prefix.clone());
        command_settings.partitions = settings.partitions;
        command_settings.services = services;
        command_settings.instance = settings.instance;
        command_settings.instances = settings.instances;
        command_settings.snapshot_every = settings.snapshot_every;
        let commands = CommandState::start(
            backend.log.clone(),
            backend.command_store.clone(),
            &command_settings,
            Arc::new(TestProvider),
            stopped,
        )
        .await
        .map_err(anyhow::Error::msg)
        .context("starting the command services")?;
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("binding {}", settings.http_addr))?;
        let router = app(commands.clone(), backend.log.backend());
        Ok(Platform {
            listener,
            router,
            shutdown,
            commands,
            backend,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The running command services (for tests and tools).
    pub fn commands(&self) -> &CommandState {
        &self.commands
    }

    /// Serves HTTP until `signal` completes, then stops the parts (tails save their snapshots).
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Platform {
            listener,
            router,
            shutdown,
            ..
        } = self;
        tracing::info!(address = %listener.local_addr()?, "serving HTTP");
        axum::serve(listener, router)
            .with_graceful_shutdown(signal)
            .await
            .context("serving HTTP")?;
        let _ = shutdown.send(true);
        // Give the tails a moment to write their final snapshots.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}

/// The whole HTTP API of this process.
pub fn app(commands: CommandState, backend: &'static str) -> Router {
    let command_routes =
        command_services::http::commands::router(&commands).with_state(commands.clone());
    let state = AppState { commands, backend };
    Router::new()
        .merge(command_routes)
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
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
}

/// 200 once every part of this process has caught up with the log; 503 before.
async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.commands.ready();
    let body = Readiness {
        status: if ready { "ready" } else { "starting" },
        backend: state.backend,
        services: state.commands.statuses(),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Order fulfilment platform",
        description = "Commands (orders, inventory) over an event log; errors are RFC 9457 problem+json."
    ),
    paths(
        command_services::http::commands::receive_stock,
        command_services::http::commands::adjust_stock,
        command_services::http::commands::place_order,
        command_services::http::commands::cancel_order,
        command_services::http::commands::ship_order,
    ),
    tags(
        (name = "orders", description = "The order's life cycle"),
        (name = "inventory", description = "Stock on hand per SKU"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

async fn openapi() -> Response {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    Json(doc).into_response()
}
