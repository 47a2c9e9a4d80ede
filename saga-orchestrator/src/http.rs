//! The saga read API: `GET /sagas/{order_id}`, `GET /sagas?state=…&stuck_for=…`, and the
//! operator's `POST /sagas/{order_id}/retry`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use http_edge::ApiQuery;
use http_edge::headers::{ANONYMOUS, Actor};
use http_edge::{ApiError, FieldError, Problem};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::driver::{self, SagaSummary};
use crate::saga::SagaState;
use crate::side::SagaSide;

fn infra(error: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(format!("saga store: {error}"))
}

/// `GET /sagas/{order_id}`: the saga's whole state (its steps with timestamps, attempts,
/// deadlines, and the ids of the events and commands involved).
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaView {
    pub revision: i64,
    /// The saga (see the `saga` module of the orchestrator for its fields).
    #[schema(value_type = Object)]
    pub saga: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SagaList {
    pub sagas: Vec<SagaSummary>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SagaFilter {
    /// `reserving_stock`, `authorising_payment`, `confirming`, `confirmed`, `completed`,
    /// `compensating`, `rejected`, `cancelled` or `needs_attention`.
    #[param(schema_with = saga_state)]
    pub state: Option<String>,
    /// Only sagas not terminal and unchanged for at least this many seconds.
    #[param(value_type = Option<i64>, minimum = 0)]
    pub stuck_for: Option<String>,
    /// 1 to 500; default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
}

/// The names of the states a saga is listed by.
fn state_names() -> [&'static str; 9] {
    SagaState::STARTED.map(SagaState::as_str)
}

/// The saga states, for the OpenAPI document.
fn saga_state() -> utoipa::openapi::schema::Schema {
    http_edge::openapi::one_of(&state_names())
}

/// One saga, by its order id.
#[utoipa::path(
    get, path = "/sagas/{order_id}", tag = "sagas",
    params(("order_id" = String, Path, description = "The order id (one saga per order)")),
    responses(
        (status = 200, description = "The saga", body = SagaView),
        (status = 404, description = "No saga for the order", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Saga database down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_saga(
    State(side): State<SagaSide>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    let (saga, revision) = driver::show(side.db(), &order_id)
        .await
        .map_err(infra)?
        .ok_or_else(|| ApiError::NotFound(format!("no saga for order {order_id}")))?;
    let saga =
        serde_json::to_value(&saga).map_err(|error| ApiError::Internal(error.to_string()))?;
    Ok(axum::Json(SagaView { revision, saga }).into_response())
}

/// Sagas by state, or stuck for longer than a threshold.
#[utoipa::path(
    get, path = "/sagas", tag = "sagas",
    params(SagaFilter),
    responses(
        (status = 400, description = "Malformed query string (a repeated parameter)", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "Matching sagas, most recently changed first", body = SagaList),
        (status = 422, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Saga database down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_sagas(
    State(side): State<SagaSide>,
    ApiQuery(filter): ApiQuery<SagaFilter>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    if let Some(state) = &filter.state
        && !state_names().contains(&state.as_str())
    {
        errors.push(FieldError::new(
            "state",
            format!("must be one of {}", state_names().join(", ")),
        ));
    }
    let stuck_for = match filter.stuck_for.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(seconds)) if seconds >= 0 => Some(Duration::from_secs(seconds.unsigned_abs())),
        Some(_) => {
            errors.push(FieldError::new(
                "stuck_for",
                "must be a whole number of seconds",
            ));
            None
        }
    };
    let limit = match filter.limit.as_deref().map(str::parse::<i64>) {
        None => 100,
        Some(Ok(limit)) if (1..=500).contains(&limit) => limit,
        Some(_) => {
            errors.push(FieldError::new("limit", "must be a number from 1 to 500"));
            100
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let sagas = driver::list(side.db(), filter.state.as_deref(), stuck_for, limit)
        .await
        .map_err(infra)?;
    Ok(axum::Json(SagaList { sagas }).into_response())
}

/// Operator: retry the pending compensation of a saga parked as `needs_attention`.
#[utoipa::path(
    post, path = "/sagas/{order_id}/retry", tag = "sagas",
    params(("order_id" = String, Path, description = "The order id")),
    responses(
        (status = 200, description = "The saga after the retry", body = SagaView),
        (status = 404, description = "No saga for the order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The saga does not need attention: nothing to retry", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Saga database down, or changed concurrently", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn retry_saga(
    State(side): State<SagaSide>,
    Path(order_id): Path<String>,
    actor: Option<Extension<Actor>>,
) -> Result<Response, ApiError> {
    let actor = actor.as_ref().map_or(ANONYMOUS, |actor| actor.0.0.as_str());
    let saga = match driver::retry(side.db(), side.config(), &order_id, actor, side.wakes())
        .await
        .map_err(infra)?
    {
        driver::Retry::Retried(saga) => *saga,
        driver::Retry::NoSaga => {
            return Err(ApiError::NotFound(format!("no saga for order {order_id}")));
        }
        driver::Retry::NothingToRetry(state) => {
            return Err(ApiError::Conflict(format!(
                "saga {order_id} is {state}, not needs_attention: nothing to retry"
            )));
        }
        driver::Retry::Changed => {
            return Err(ApiError::Unavailable(
                "the saga changed concurrently; look again and retry".into(),
            ));
        }
    };
    let (_, revision) = driver::show(side.db(), &order_id)
        .await
        .map_err(infra)?
        .ok_or_else(|| ApiError::NotFound(format!("no saga for order {order_id}")))?;
    let saga =
        serde_json::to_value(&saga).map_err(|error| ApiError::Internal(error.to_string()))?;
    Ok(axum::Json(SagaView { revision, saga }).into_response())
}

/// The saga routes: reading sagas is of the read class, retrying one of the operator class.
pub fn router() -> Router<SagaSide> {
    use http_edge::security::{RouteClass, routes};
    let reads = Router::new()
        .route("/sagas", get(list_sagas))
        .route("/sagas/{order_id}", get(get_saga));
    let operations = Router::new().route("/sagas/{order_id}/retry", post(retry_saga));
    routes(reads, RouteClass::Read).merge(routes(operations, RouteClass::Operator))
}
