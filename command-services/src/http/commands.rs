//! The public command routes: inventory receipts and adjustments, and the order's life cycle.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use domain::order::{OrderAggregate, OrderCommand, OrderError, OrderLine, PlaceOrder};
use domain::stock::{StockAggregate, StockCommand, StockError};
use domain::{Aggregate, Currency, CustomerId, OrderId, PaymentToken, Quantity, Sku};
use event_schema::EventCodec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::CommandState;
use crate::owner::{CommandError, CommandRequest, Outcome, Owner};
use http_edge::error::{ApiError, FieldError, Problem};
use http_edge::extract::{ApiJson, OptionalJson};
use http_edge::headers::{CONSISTENCY_TOKEN, CORRELATION_ID, CommandHeaders};
use http_edge::security::{self, RouteClass};

// ---------------------------------------------------------------------------------------------
// Requests and responses

/// `POST /inventory/{sku}/receipts`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiveStockRequest {
    /// Units received.
    #[schema(minimum = 1, maximum = 4294967295_i64, example = 10)]
    #[serde(deserialize_with = "http_edge::extract::whole_number")]
    pub quantity: i64,
}

/// `POST /inventory/{sku}/adjustments`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustStockRequest {
    /// Units to add (positive) or remove (negative); not zero, and no more than the most any
    /// item may hold (2^53 − 1) either way.
    #[schema(schema_with = stock_delta, example = -2)]
    #[serde(deserialize_with = "http_edge::extract::whole_number")]
    pub delta: i64,
    #[schema(schema_with = http_edge::openapi::reason, example = "damaged")]
    pub reason: String,
}

/// One line of `POST /orders`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLineRequest {
    #[schema(schema_with = http_edge::openapi::sku, example = "SKU-1")]
    pub sku: String,
    #[schema(minimum = 1, maximum = 4294967295_i64, example = 2)]
    #[serde(deserialize_with = "http_edge::extract::whole_number")]
    pub quantity: i64,
    /// Price of one unit in minor units of the order's currency.
    #[schema(minimum = 0, example = 1999)]
    #[serde(deserialize_with = "http_edge::extract::whole_number")]
    pub unit_price_minor: i64,
}

/// `POST /orders`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    #[schema(schema_with = http_edge::openapi::customer_id, example = "c-1")]
    pub customer_id: String,
    /// ISO 4217 code.
    #[schema(schema_with = currency, example = "EUR")]
    pub currency: String,
    /// Test tokens: `tok_approve`, `tok_decline`, `tok_timeout`, `tok_flaky`.
    #[schema(schema_with = http_edge::openapi::payment_token, example = "tok_approve")]
    pub payment_token: String,
    /// 1 to 100 lines, each of another SKU, whose total (quantity × unit price, summed) is at
    /// most 9,223,372,036,854,775,807 minor units. (JSON Schema cannot say the last two.)
    #[schema(min_items = 1, max_items = 100)]
    pub lines: Vec<OrderLineRequest>,
}

/// The ISO 4217 codes, for the OpenAPI document.
fn currency() -> utoipa::openapi::schema::Schema {
    http_edge::openapi::one_of(domain::money::ISO_4217)
}

/// A stock adjustment, for the OpenAPI document.
fn stock_delta() -> utoipa::openapi::schema::Schema {
    let most = domain::stock::MAX_ON_HAND as i64;
    http_edge::openapi::nonzero_between(-most, most)
}

/// `POST /orders/{id}/cancel` (the body is optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelOrderRequest {
    #[schema(schema_with = http_edge::openapi::reason)]
    pub reason: Option<String>,
}

/// What a successful command answers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandAccepted {
    /// `order`, `stock` or `customer`.
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Set on order routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// Set on inventory routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// Set on customer routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// The aggregate's version after the command.
    pub version: u64,
    /// The log position written (or the aggregate's latest, when nothing was written); pass it
    /// to a query as `X-Consistency-Token` to read your own write.
    pub consistency_token: Option<String>,
    /// `appended`, `unchanged` (already in effect) or `repeated` (a retried idempotency key).
    pub outcome: String,
}

// ---------------------------------------------------------------------------------------------
// Parsing: DTOs become commands before any IO.

fn quantity(field: &str, raw: i64, errors: &mut Vec<FieldError>) -> Option<Quantity> {
    match u32::try_from(raw).ok().map(Quantity::new) {
        Some(Ok(quantity)) => Some(quantity),
        _ => {
            errors.push(FieldError::new(
                field,
                "must be a whole number from 1 to 4294967295",
            ));
            None
        }
    }
}

fn sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|error| ApiError::Validation(vec![FieldError::new("sku", error)]))
}

fn order_id(raw: &str) -> Result<OrderId, ApiError> {
    OrderId::parse(raw).map_err(|_| ApiError::NotFound(format!("order {raw} does not exist")))
}

fn validated<T>(value: Option<T>, errors: Vec<FieldError>) -> Result<T, ApiError> {
    match value {
        Some(value) if errors.is_empty() => Ok(value),
        _ => Err(ApiError::Validation(errors)),
    }
}

impl PlaceOrderRequest {
    fn into_command(self, order_id: OrderId) -> Result<PlaceOrder, ApiError> {
        let mut errors = Vec::new();
        let customer_id = CustomerId::parse(&self.customer_id)
            .map_err(|error| errors.push(FieldError::new("customer_id", error)))
            .ok();
        let currency = self
            .currency
            .parse::<Currency>()
            .map_err(|error| errors.push(FieldError::new("currency", error)))
            .ok();
        let payment_token = PaymentToken::parse(&self.payment_token)
            .map_err(|error| errors.push(FieldError::new("payment_token", error)))
            .ok();
        if self.lines.is_empty() {
            errors.push(FieldError::new("lines", "an order needs at least one line"));
        }
        let mut lines = Vec::with_capacity(self.lines.len());
        for (index, line) in self.lines.iter().enumerate() {
            let sku = Sku::parse(&line.sku)
                .map_err(|error| errors.push(FieldError::new(format!("lines[{index}].sku"), error)))
                .ok();
            let quantity = quantity(
                &format!("lines[{index}].quantity"),
                line.quantity,
                &mut errors,
            );
            if line.unit_price_minor < 0 {
                errors.push(FieldError::new(
                    format!("lines[{index}].unit_price_minor"),
                    "must not be negative",
                ));
            }
            if let (Some(sku), Some(quantity)) = (sku, quantity) {
                lines.push(OrderLine {
                    sku,
                    quantity,
                    unit_price_minor: line.unit_price_minor,
                });
            }
        }
        let command = match (customer_id, currency, payment_token) {
            (Some(customer_id), Some(currency), Some(payment_token)) => Some(PlaceOrder {
                order_id,
                customer_id,
                currency,
                payment_token,
                lines,
            }),
            _ => None,
        };
        validated(command, errors)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

fn order_error(error: OrderError) -> ApiError {
    match error {
        OrderError::NotFound => ApiError::NotFound(error.to_string()),
        OrderError::NoLines
        | OrderError::TooManyLines
        | OrderError::DuplicateSku(_)
        | OrderError::NegativePrice(_)
        | OrderError::TotalTooLarge
        | OrderError::EmptyReason
        | OrderError::ReasonTooLong => ApiError::Unprocessable(error.to_string()),
        OrderError::AlreadyPlaced
        | OrderError::AlreadyConfirmed
        | OrderError::Rejected
        | OrderError::Cancelled
        | OrderError::AlreadyShipped
        | OrderError::NotConfirmed => ApiError::Conflict(error.to_string()),
    }
}

fn stock_error(error: StockError) -> ApiError {
    match error {
        StockError::ZeroAdjustment | StockError::EmptyReason | StockError::ReasonTooLong => {
            ApiError::Unprocessable(error.to_string())
        }
        // What the item holds now decides these: the same request may succeed later.
        StockError::BelowReserved { .. } | StockError::NoReservation(_) | StockError::Overflow => {
            ApiError::Conflict(error.to_string())
        }
    }
}

/// Maps the owner's errors; the domain's own go through `domain`.
pub fn command_error<E: std::fmt::Display>(
    error: CommandError<E>,
    domain: impl FnOnce(E) -> ApiError,
) -> ApiError {
    match error {
        CommandError::Domain(error) => domain(error),
        CommandError::VersionConflict { expected, actual } => {
            ApiError::VersionConflict { expected, actual }
        }
        CommandError::IdempotencyMismatch => ApiError::IdempotencyMismatch,
        // Routing information: another instance (or this one, once ready) decides it.
        other @ (CommandError::NotReady
        | CommandError::NotOwner { .. }
        | CommandError::Fenced { .. }
        | CommandError::SteppedDown { .. }) => ApiError::Misrouted(other.to_string()),
        other @ (CommandError::Contended { .. }
        | CommandError::Unavailable(_)
        | CommandError::Log(_)
        | CommandError::AheadOfLog { .. }) => ApiError::Unavailable(other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

fn owner<A: EventCodec>(owner: &Option<Owner<A>>) -> Result<&Owner<A>, ApiError> {
    owner.as_ref().ok_or_else(|| {
        ApiError::Unavailable(format!(
            "the {} service does not run in this process",
            A::TYPE
        ))
    })
}

/// A command's answer: the body, its `ETag`, consistency token and correlation id, and for a
/// created aggregate (201) its `Location`.
pub(crate) fn accepted(
    status: StatusCode,
    body: CommandAccepted,
    headers: &CommandHeaders,
) -> Response {
    let mut response_headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&format!("\"{}\"", body.version)) {
        response_headers.insert(header::ETAG, value);
    }
    if let Some(token) = body
        .consistency_token
        .as_deref()
        .and_then(|token| HeaderValue::from_str(token).ok())
    {
        response_headers.insert(CONSISTENCY_TOKEN, token);
    }
    if let Ok(value) = HeaderValue::from_str(&headers.correlation_id) {
        response_headers.insert(CORRELATION_ID, value);
    }
    let location = match (&body.order_id, &body.customer_id) {
        (Some(order_id), _) => Some(format!("/orders/{order_id}")),
        (None, Some(customer_id)) => Some(format!("/customers/{customer_id}")),
        (None, None) => None,
    };
    if status == StatusCode::CREATED
        && let Some(location) = location.and_then(|location| HeaderValue::from_str(&location).ok())
    {
        response_headers.insert(header::LOCATION, location);
    }
    (status, response_headers, axum::Json(body)).into_response()
}

pub(crate) fn describe(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Appended { .. } => "appended",
        Outcome::Unchanged { .. } => "unchanged",
        Outcome::Repeated { .. } => "repeated",
    }
}

async fn run_stock(
    state: &CommandState,
    sku: Sku,
    command: StockCommand,
    headers: &CommandHeaders,
    fingerprint: String,
) -> Result<Response, ApiError> {
    let owner = owner(&state.stock)?;
    let request = CommandRequest {
        aggregate_id: sku.to_string(),
        command,
        meta: headers.meta("inventory", &fingerprint),
        expected_version: headers.expected_version,
    };
    let outcome = owner
        .execute(request)
        .await
        .map_err(|error| command_error(error, stock_error))?;
    let body = CommandAccepted {
        aggregate_type: StockAggregate::TYPE.to_owned(),
        aggregate_id: sku.to_string(),
        order_id: None,
        sku: Some(sku.to_string()),
        customer_id: None,
        version: outcome.version(),
        consistency_token: outcome.position().map(ToString::to_string),
        outcome: describe(&outcome).to_owned(),
    };
    Ok(accepted(StatusCode::OK, body, headers))
}

async fn run_order(
    state: &CommandState,
    order_id: OrderId,
    command: OrderCommand,
    headers: &CommandHeaders,
    fingerprint: String,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let owner = owner(&state.orders)?;
    let request = CommandRequest {
        aggregate_id: order_id.to_string(),
        command,
        meta: headers.meta("order", &fingerprint),
        expected_version: headers.expected_version,
    };
    let outcome = owner
        .execute(request)
        .await
        .map_err(|error| command_error(error, order_error))?;
    let body = CommandAccepted {
        aggregate_type: OrderAggregate::TYPE.to_owned(),
        aggregate_id: order_id.to_string(),
        order_id: Some(order_id.to_string()),
        sku: None,
        customer_id: None,
        version: outcome.version(),
        consistency_token: outcome.position().map(ToString::to_string),
        outcome: describe(&outcome).to_owned(),
    };
    Ok(accepted(status, body, headers))
}

fn fingerprint(route: &str, body: &impl Serialize) -> String {
    // serde_json's map keeps keys sorted, so equal bodies give equal fingerprints.
    let body = serde_json::to_value(body)
        .map(|value| value.to_string())
        .unwrap_or_default();
    format!("{route}\n{body}")
}

/// Add stock to a SKU.
#[utoipa::path(
    post, path = "/inventory/{sku}/receipts", tag = "inventory",
    params(("sku" = String, Path, description = "The SKU", pattern = "^[A-Za-z0-9._-]+$", min_length = 1, max_length = 64), CommandHeaderDocs),
    request_body = ReceiveStockRequest,
    responses(
        (status = 200, description = "Stock received", body = CommandAccepted),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Would hold more than 2^53 − 1 units, or version conflict", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or idempotency key reused with another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Log unavailable or not ready", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn receive_stock(
    State(state): State<CommandState>,
    Path(raw_sku): Path<String>,
    headers: CommandHeaders,
    ApiJson(body): ApiJson<ReceiveStockRequest>,
) -> Result<Response, ApiError> {
    let sku = sku(&raw_sku)?;
    let mut errors = Vec::new();
    let quantity = quantity("quantity", body.quantity, &mut errors);
    let command = validated(
        quantity.map(|quantity| StockCommand::Receive { quantity }),
        errors,
    )?;
    let fingerprint = fingerprint(&format!("POST /inventory/{sku}/receipts"), &body);
    run_stock(&state, sku, command, &headers, fingerprint).await
}

/// Correct the count on hand of a SKU.
#[utoipa::path(
    post, path = "/inventory/{sku}/adjustments", tag = "inventory",
    params(("sku" = String, Path, description = "The SKU", pattern = "^[A-Za-z0-9._-]+$", min_length = 1, max_length = 64), CommandHeaderDocs),
    request_body = AdjustStockRequest,
    responses(
        (status = 200, description = "Stock adjusted", body = CommandAccepted),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Would go below the reserved units or above 2^53 − 1, or version conflict", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or idempotency key reused with another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Log unavailable or not ready", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn adjust_stock(
    State(state): State<CommandState>,
    Path(raw_sku): Path<String>,
    headers: CommandHeaders,
    ApiJson(body): ApiJson<AdjustStockRequest>,
) -> Result<Response, ApiError> {
    let sku = sku(&raw_sku)?;
    let most = domain::stock::MAX_ON_HAND;
    if body.delta.unsigned_abs() > most {
        return Err(ApiError::Validation(vec![FieldError::new(
            "delta",
            format!("must be from -{most} to {most}: no item holds more"),
        )]));
    }
    let fingerprint = fingerprint(&format!("POST /inventory/{sku}/adjustments"), &body);
    let command = StockCommand::Adjust {
        delta: body.delta,
        reason: body.reason,
    };
    run_stock(&state, sku, command, &headers, fingerprint).await
}

/// Place an order; the fulfilment saga then reserves stock and authorises payment.
#[utoipa::path(
    post, path = "/orders", tag = "orders",
    params(CommandHeaderDocs),
    request_body = PlaceOrderRequest,
    responses(
        (status = 201, description = "Order placed (pending)", body = CommandAccepted),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The order exists already (an If-Match that does not hold)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or idempotency key reused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Log unavailable or not ready", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn place_order(
    State(state): State<CommandState>,
    headers: CommandHeaders,
    ApiJson(body): ApiJson<PlaceOrderRequest>,
) -> Result<Response, ApiError> {
    let order_id = OrderId(headers.new_id("order-id"));
    let fingerprint = fingerprint("POST /orders", &body);
    let command = OrderCommand::Place(body.into_command(order_id)?);
    run_order(
        &state,
        order_id,
        command,
        &headers,
        fingerprint,
        StatusCode::CREATED,
    )
    .await
}

/// Cancel an order (allowed until it ships; a confirmed order is then refunded and restocked).
#[utoipa::path(
    post, path = "/orders/{id}/cancel", tag = "orders",
    params(("id" = String, Path, description = "The order id"), CommandHeaderDocs),
    request_body(content = Option<CancelOrderRequest>, description = "Optional reason"),
    responses(
        (status = 200, description = "Order cancelled", body = CommandAccepted),
        (status = 400, description = "Malformed JSON or header", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already shipped or rejected, or version conflict", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid reason, or idempotency key reused with another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Log unavailable or not ready", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel_order(
    State(state): State<CommandState>,
    Path(raw_id): Path<String>,
    headers: CommandHeaders,
    OptionalJson(body): OptionalJson<CancelOrderRequest>,
) -> Result<Response, ApiError> {
    let order_id = order_id(&raw_id)?;
    let body = body.unwrap_or_default();
    let fingerprint = fingerprint(&format!("POST /orders/{order_id}/cancel"), &body);
    let command = OrderCommand::Cancel {
        reason: body.reason,
    };
    run_order(
        &state,
        order_id,
        command,
        &headers,
        fingerprint,
        StatusCode::OK,
    )
    .await
}

/// Mark a confirmed order shipped.
#[utoipa::path(
    post, path = "/orders/{id}/ship", tag = "orders",
    params(("id" = String, Path, description = "The order id"), CommandHeaderDocs),
    responses(
        (status = 200, description = "Order shipped", body = CommandAccepted),
        (status = 400, description = "Malformed header", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not confirmed, or version conflict", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Idempotency key reused with another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Log unavailable or not ready", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ship_order(
    State(state): State<CommandState>,
    Path(raw_id): Path<String>,
    headers: CommandHeaders,
) -> Result<Response, ApiError> {
    let order_id = order_id(&raw_id)?;
    let fingerprint = format!("POST /orders/{order_id}/ship");
    run_order(
        &state,
        order_id,
        OrderCommand::Ship,
        &headers,
        fingerprint,
        StatusCode::OK,
    )
    .await
}

/// The command headers, for the OpenAPI document.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct CommandHeaderDocs {
    /// A retry with the same key returns the original response and appends nothing; the same
    /// key with a different request is a 422.
    #[param(rename = "Idempotency-Key", schema_with = http_edge::openapi::header_text)]
    idempotency_key: Option<String>,
    /// `"<version>"`: refuse with 409 unless the aggregate is at this version.
    #[param(rename = "If-Match", schema_with = http_edge::openapi::if_match)]
    if_match: Option<String>,
    /// Ties this request to everything it causes; echoed back. One is generated when it is
    /// absent, blank, longer than 255 characters or not visible ASCII.
    #[param(rename = "X-Correlation-Id")]
    x_correlation_id: Option<String>,
}

/// The command routes of the services present in `state`, all of the command class.
pub fn router(state: &CommandState) -> Router<CommandState> {
    let mut router = Router::new();
    if state.stock.is_some() {
        router = router
            .route("/inventory/{sku}/receipts", post(receive_stock))
            .route("/inventory/{sku}/adjustments", post(adjust_stock));
    }
    if state.orders.is_some() {
        router = router
            .route("/orders", post(place_order))
            .route("/orders/{id}/cancel", post(cancel_order))
            .route("/orders/{id}/ship", post(ship_order));
    }
    security::routes(router, RouteClass::Command)
}
