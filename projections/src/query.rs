//! The public query API: orders, a customer's orders, stock per SKU (and low stock), payments.
//!
//! Every answer carries an `ETag`; `If-None-Match` with it answers 304. A query carrying a
//! command's consistency token (`X-Consistency-Token` header or `?after=`) answers only once the
//! read model has applied that position, or 503 with `Retry-After` after a bounded wait.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use event_log::Position;
use http_edge::ApiQuery;
use http_edge::{ApiError, FieldError, Problem};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::ReadSide;
use crate::db::{Db, DbError, Row, Value};

/// How long a read-your-writes query waits for the read model.
pub const CONSISTENCY_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrderLineView {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_minor: i64,
    /// `pending`, `reserved`, `rejected`, `released` or `committed`.
    pub reservation: String,
}

/// `GET /orders/{id}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    pub order_id: String,
    pub customer_id: String,
    /// `pending`, `confirmed`, `rejected`, `cancelled` or `shipped`.
    pub status: String,
    pub lines: Vec<OrderLineView>,
    pub total_minor: i64,
    pub currency: String,
    /// The payment's status (`none` until the payment service has decided).
    pub payment_status: String,
    /// `pending` until every line is reserved; then `reserved`; `rejected` if any line was.
    pub reservation_status: String,
    /// Why it was rejected or cancelled.
    pub reason: Option<String>,
    /// RFC 3339.
    pub placed_at: String,
    pub updated_at: String,
    /// The order aggregate's version.
    pub version: i64,
}

/// `GET /orders?customer_id=…`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrderPage {
    pub orders: Vec<OrderView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /inventory/{sku}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StockView {
    pub sku: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
    pub version: i64,
}

/// `GET /inventory?below=…`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StockList {
    pub items: Vec<StockView>,
}

/// `GET /payments/{order_id}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PaymentView {
    pub order_id: String,
    /// `authorised`, `declined`, `captured`, `partially_refunded`, `refunded` or `voided`.
    pub status: String,
    pub currency: Option<String>,
    pub authorised_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub reason: Option<String>,
    pub version: i64,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Consistency {
    /// A consistency token from a command: answer only once the read model includes it.
    #[param(schema_with = http_edge::openapi::position)]
    pub after: Option<String>,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OrderFilter {
    /// Whose orders.
    #[param(required = true, min_length = 1)]
    pub customer_id: Option<String>,
    /// `pending`, `confirmed`, `rejected`, `cancelled` or `shipped`.
    #[param(schema_with = order_status)]
    pub status: Option<String>,
    /// 1 to 100; default 20.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// A page's `next_cursor`: the next (older) page.
    #[param(pattern = "^-?[0-9]{1,18}_")]
    pub cursor: Option<String>,
    #[param(schema_with = http_edge::openapi::position)]
    pub after: Option<String>,
}

/// The order statuses, for the OpenAPI document.
fn order_status() -> utoipa::openapi::schema::Schema {
    http_edge::openapi::one_of(&STATUSES)
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StockFilter {
    /// List the SKUs whose available stock is below this.
    #[param(required = true, value_type = i64)]
    pub below: Option<String>,
    #[param(schema_with = http_edge::openapi::position)]
    pub after: Option<String>,
}

fn db<'a>(read: &'a ReadSide, projection: &str) -> Result<&'a Db, ApiError> {
    read.db(projection).ok_or_else(|| {
        ApiError::Unavailable(format!(
            "the {projection} read model does not run in this process"
        ))
    })
}

fn infra(error: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(format!("read model: {error}"))
}

/// Read-your-writes: waits for the token, if there is one.
async fn consistent(
    read: &ReadSide,
    projection: &str,
    headers: &HeaderMap,
    after: Option<&str>,
) -> Result<(), ApiError> {
    let token = match headers.get("x-consistency-token") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::BadRequest("X-Consistency-Token must be text".into()))?
                .to_owned(),
        ),
        None => after.map(str::to_owned),
    };
    let Some(token) = token else {
        return Ok(());
    };
    let position: Position = token.parse().map_err(ApiError::BadRequest)?;
    if read
        .wait_for(projection, &position, CONSISTENCY_WAIT)
        .await
        .map_err(infra)?
    {
        Ok(())
    } else {
        Err(ApiError::Unavailable(format!(
            "the {projection} read model has not reached {position} within {} s; retry",
            CONSISTENCY_WAIT.as_secs()
        )))
    }
}

/// A stable tag for a body: FNV-1a of its JSON.
fn etag_of(body: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{hash:016x}\"")
}

fn respond(headers: &HeaderMap, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let etag = etag_of(&bytes);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response()
    };
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// An order's view from its summary row, its payment's status and its reservations (sku,
/// status).
fn order_view(row: &Row, payment: Option<String>, reservations: &[(String, String)]) -> OrderView {
    let lines: Vec<domain::order::OrderLine> =
        serde_json::from_str(&row.text("lines")).unwrap_or_default();
    let lines: Vec<OrderLineView> = lines
        .into_iter()
        .map(|line| OrderLineView {
            reservation: reservations
                .iter()
                .find(|(sku, _)| sku == line.sku.as_str())
                .map(|(_, status)| status.clone())
                .unwrap_or_else(|| "pending".into()),
            sku: line.sku.to_string(),
            quantity: i64::from(line.quantity.get()),
            unit_price_minor: line.unit_price_minor,
        })
        .collect();
    let statuses: Vec<&str> = lines.iter().map(|line| line.reservation.as_str()).collect();
    let reservation_status = if statuses.contains(&"rejected") {
        "rejected"
    } else if statuses.iter().all(|status| *status == "committed") {
        "committed"
    } else if statuses.iter().all(|status| *status == "released") {
        "released"
    } else if statuses
        .iter()
        .all(|status| *status == "reserved" || *status == "committed")
    {
        "reserved"
    } else {
        "pending"
    };
    OrderView {
        order_id: row.text("order_id"),
        customer_id: row.text("customer_id"),
        status: row.text("status"),
        lines,
        total_minor: row.int("total_minor"),
        currency: row.text("currency"),
        payment_status: payment.unwrap_or_else(|| "none".into()),
        reservation_status: reservation_status.into(),
        reason: row.get("reason").text().map(str::to_owned),
        placed_at: rfc3339(row.int("placed_at")),
        updated_at: rfc3339(row.int("updated_at")),
        version: row.int("version"),
    }
}

/// The views of a page of summary rows: their payments and reservations in one query each.
async fn order_views(db: &Db, rows: Vec<Row>) -> Result<Vec<OrderView>, ApiError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Value> = rows
        .iter()
        .map(|row| Value::from(row.text("order_id")))
        .collect();
    let list = (1..=ids.len())
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let payments: HashMap<String, String> = db
        .fetch_all(
            &format!("SELECT order_id, status FROM order_payment WHERE order_id IN ({list})"),
            &ids,
        )
        .await
        .map_err(infra)?
        .into_iter()
        .map(|row| (row.text("order_id"), row.text("status")))
        .collect();
    let mut reservations: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for row in db
        .fetch_all(
            &format!(
                "SELECT order_id, sku, status FROM order_reservations WHERE order_id IN ({list})"
            ),
            &ids,
        )
        .await
        .map_err(infra)?
    {
        reservations
            .entry(row.text("order_id"))
            .or_default()
            .push((row.text("sku"), row.text("status")));
    }
    Ok(rows
        .iter()
        .map(|row| {
            let id = row.text("order_id");
            order_view(
                row,
                payments.get(&id).cloned(),
                reservations.get(&id).map(Vec::as_slice).unwrap_or_default(),
            )
        })
        .collect())
}

/// An order, with its payment and reservation status.
#[utoipa::path(
    get, path = "/orders/{id}", tag = "orders",
    params(("id" = String, Path, description = "The order id"), Consistency),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed consistency token or query string", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind the consistency token, or down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_order(
    State(read): State<ReadSide>,
    Path(id): Path<String>,
    ApiQuery(consistency): ApiQuery<Consistency>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    consistent(&read, "orders", &headers, consistency.after.as_deref()).await?;
    let view = order(db(&read, "orders")?, &id)
        .await
        .map_err(infra)?
        .ok_or_else(|| ApiError::NotFound(format!("order {id} does not exist")))?;
    Ok(respond(&headers, &view))
}

/// An order as the orders read model holds it, if it has one.
pub async fn order(db: &Db, id: &str) -> Result<Option<OrderView>, DbError> {
    // One round trip: the summary with its payment status, one row per reservation (or one
    // row with none).
    let rows = db
        .fetch_all(
            "SELECT s.*, p.status AS payment_status, r.sku AS reservation_sku,
                    r.status AS reservation_status
             FROM order_summary s
             LEFT JOIN order_payment p ON p.order_id = s.order_id
             LEFT JOIN order_reservations r ON r.order_id = s.order_id
             WHERE s.order_id = $1",
            &[id.into()],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let reservations: Vec<(String, String)> = rows
        .iter()
        .filter_map(|row| {
            Some((
                row.get("reservation_sku").text()?.to_owned(),
                row.text("reservation_status"),
            ))
        })
        .collect();
    let payment = first.get("payment_status").text().map(str::to_owned);
    Ok(Some(order_view(first, payment, &reservations)))
}

const STATUSES: [&str; 5] = ["pending", "confirmed", "rejected", "cancelled", "shipped"];

/// A customer's orders, newest first, optionally by status.
#[utoipa::path(
    get, path = "/orders", tag = "orders",
    params(OrderFilter),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed cursor, token or query string", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind the consistency token, or down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_orders(
    State(read): State<ReadSide>,
    ApiQuery(filter): ApiQuery<OrderFilter>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    let customer_id = filter.customer_id.clone().unwrap_or_default();
    if customer_id.is_empty() {
        errors.push(FieldError::new("customer_id", "is required"));
    }
    if let Some(status) = &filter.status
        && !STATUSES.contains(&status.as_str())
    {
        errors.push(FieldError::new(
            "status",
            format!("must be one of {}", STATUSES.join(", ")),
        ));
    }
    let limit = match filter.limit.as_deref().map(str::parse::<i64>) {
        None => 20,
        Some(Ok(limit)) if (1..=100).contains(&limit) => limit,
        Some(_) => {
            errors.push(FieldError::new("limit", "must be a number from 1 to 100"));
            20
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let cursor = match &filter.cursor {
        None => None,
        Some(raw) => Some(
            raw.split_once('_')
                .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_owned())))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("{raw:?} is not a cursor from this API"))
                })?,
        ),
    };
    consistent(&read, "orders", &headers, filter.after.as_deref()).await?;
    let db = db(&read, "orders")?;
    let mut sql = String::from("SELECT * FROM order_summary WHERE customer_id = $1");
    let mut args: Vec<Value> = vec![customer_id.as_str().into()];
    if let Some(status) = &filter.status {
        args.push(status.as_str().into());
        sql.push_str(&format!(" AND status = ${}", args.len()));
    }
    if let Some((at, id)) = &cursor {
        args.push((*at).into());
        let at_n = args.len();
        args.push(id.as_str().into());
        sql.push_str(&format!(
            " AND (placed_at < ${at_n} OR (placed_at = ${at_n} AND order_id < ${}))",
            args.len()
        ));
    }
    args.push((limit + 1).into());
    sql.push_str(&format!(
        " ORDER BY placed_at DESC, order_id DESC LIMIT ${}",
        args.len()
    ));
    let mut rows = db.fetch_all(&sql, &args).await.map_err(infra)?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last()
            .map(|row| format!("{}_{}", row.int("placed_at"), row.text("order_id")))
    } else {
        None
    };
    let orders = order_views(db, rows).await?;
    Ok(respond(
        &headers,
        &OrderPage {
            orders,
            next_cursor,
        },
    ))
}

fn stock_view(row: &Row) -> StockView {
    StockView {
        sku: row.text("sku"),
        on_hand: row.int("on_hand"),
        reserved: row.int("reserved"),
        available: row.int("available"),
        version: row.int("version"),
    }
}

/// Stock of one SKU.
#[utoipa::path(
    get, path = "/inventory/{sku}", tag = "inventory",
    params(("sku" = String, Path, description = "The SKU"), Consistency),
    responses(
        (status = 200, description = "Stock of the SKU", body = StockView),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed consistency token or query string", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No stock was ever recorded for the SKU", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind the consistency token, or down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_stock(
    State(read): State<ReadSide>,
    Path(sku): Path<String>,
    ApiQuery(consistency): ApiQuery<Consistency>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    consistent(&read, "inventory", &headers, consistency.after.as_deref()).await?;
    let view = stock(db(&read, "inventory")?, &sku)
        .await
        .map_err(infra)?
        .ok_or_else(|| ApiError::NotFound(format!("sku {sku} has no stock record")))?;
    Ok(respond(&headers, &view))
}

/// A SKU's stock as the inventory read model holds it, if it has a record.
pub async fn stock(db: &Db, sku: &str) -> Result<Option<StockView>, DbError> {
    Ok(db
        .fetch_optional("SELECT * FROM stock_levels WHERE sku = $1", &[sku.into()])
        .await?
        .map(|row| stock_view(&row)))
}

/// The low-stock list: SKUs whose available stock is below a threshold, lowest first.
#[utoipa::path(
    get, path = "/inventory", tag = "inventory",
    params(StockFilter),
    responses(
        (status = 200, description = "SKUs below the threshold", body = StockList),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed consistency token or query string", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid threshold", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind the consistency token, or down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn low_stock(
    State(read): State<ReadSide>,
    ApiQuery(filter): ApiQuery<StockFilter>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let below = match filter.below.as_deref().map(str::parse::<i64>) {
        Some(Ok(below)) => below,
        _ => {
            return Err(ApiError::Validation(vec![FieldError::new(
                "below",
                "is required: a whole number (list the SKUs with less available)",
            )]));
        }
    };
    consistent(&read, "inventory", &headers, filter.after.as_deref()).await?;
    let rows = db(&read, "inventory")?
        .fetch_all(
            "SELECT * FROM stock_levels WHERE available < $1 ORDER BY available, sku LIMIT 500",
            &[below.into()],
        )
        .await
        .map_err(infra)?;
    Ok(respond(
        &headers,
        &StockList {
            items: rows.iter().map(stock_view).collect(),
        },
    ))
}

/// The payment of an order.
#[utoipa::path(
    get, path = "/payments/{order_id}", tag = "payments",
    params(("order_id" = String, Path, description = "The order id"), Consistency),
    responses(
        (status = 200, description = "The payment", body = PaymentView),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed consistency token or query string", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No payment for the order (yet)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind the consistency token, or down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_payment(
    State(read): State<ReadSide>,
    Path(order_id): Path<String>,
    ApiQuery(consistency): ApiQuery<Consistency>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    consistent(&read, "payments", &headers, consistency.after.as_deref()).await?;
    let view = payment(db(&read, "payments")?, &order_id)
        .await
        .map_err(infra)?
        .ok_or_else(|| ApiError::NotFound(format!("order {order_id} has no payment")))?;
    Ok(respond(&headers, &view))
}

/// An order's payment as the payments read model holds it, if it has one.
pub async fn payment(db: &Db, order_id: &str) -> Result<Option<PaymentView>, DbError> {
    Ok(db
        .fetch_optional(
            "SELECT * FROM payments WHERE order_id = $1",
            &[order_id.into()],
        )
        .await?
        .map(|row| PaymentView {
            order_id: row.text("order_id"),
            status: row.text("status"),
            currency: row.get("currency").text().map(str::to_owned),
            authorised_minor: row.int("authorised_minor"),
            captured_minor: row.int("captured_minor"),
            refunded_minor: row.int("refunded_minor"),
            reason: row.get("reason").text().map(str::to_owned),
            version: row.int("version"),
        }))
}

/// `GET /customers/{id}`: the customer as the customers read model holds them, personal
/// fields opened with the key store.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CustomerView {
    pub customer_id: String,
    /// `registered` or `erased`.
    pub status: String,
    /// Absent once the customer is erased (or while the fields cannot be opened).
    pub name: Option<String>,
    pub email: Option<String>,
    /// `readable`; `erased` (the key is gone, the fields with it, for good); or `unreadable`
    /// (no key opens them: this process has no key store, or the key is not the one they were
    /// sealed with).
    pub personal_data: String,
    /// RFC 3339.
    pub registered_at: String,
    pub updated_at: String,
    pub erased_at: Option<String>,
    /// The customer aggregate's version.
    pub version: i64,
}

/// A customer, with their name and email address (or, once erased, without).
#[utoipa::path(
    get, path = "/customers/{id}", tag = "customers",
    params(("id" = String, Path, description = "The customer id"), Consistency),
    responses(
        (status = 200, description = "The customer", body = CustomerView),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed consistency token or query string", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such customer (yet)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind the consistency token, or down", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_customer(
    State(read): State<ReadSide>,
    Path(customer_id): Path<String>,
    ApiQuery(consistency): ApiQuery<Consistency>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    consistent(&read, "customers", &headers, consistency.after.as_deref()).await?;
    let view = customer(&read, &customer_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("customer {customer_id} does not exist")))?;
    Ok(respond(&headers, &view))
}

/// A customer as the customers read model holds them, fields opened with the read side's keys.
pub async fn customer(
    read: &ReadSide,
    customer_id: &str,
) -> Result<Option<CustomerView>, ApiError> {
    let Some(row) = db(read, "customers")?
        .fetch_optional(
            "SELECT * FROM customers WHERE customer_id = $1",
            &[customer_id.into()],
        )
        .await
        .map_err(infra)?
    else {
        return Ok(None);
    };
    let id = domain::CustomerId::parse(customer_id)
        .map_err(|error| ApiError::NotFound(format!("customer {customer_id}: {error}")))?;
    let key = match (read.keys(), row.text("status").as_str()) {
        (_, "erased") => personal_data::KeyState::Erased {
            at: row.get("erased_at").int().unwrap_or_default(),
        },
        (Some(keys), _) => keys
            .key(&id)
            .await
            .map_err(|error| ApiError::Unavailable(error.to_string()))?,
        (None, _) => personal_data::KeyState::Unknown,
    };
    let open = |field: &str| -> personal_data::Opened {
        match row
            .get(field)
            .text()
            .and_then(|raw| personal_data::Sealed::parse(raw).ok())
        {
            Some(sealed) => personal_data::open(&key, &id, field, &sealed),
            None if matches!(key, personal_data::KeyState::Erased { .. }) => {
                personal_data::Opened::Erased
            }
            None => personal_data::Opened::Unreadable,
        }
    };
    let (name, email) = (open("name"), open("email"));
    let personal_data = match (&name, &email) {
        (personal_data::Opened::Text(_), personal_data::Opened::Text(_)) => "readable",
        (personal_data::Opened::Erased, _) | (_, personal_data::Opened::Erased) => "erased",
        _ => "unreadable",
    };
    Ok(Some(CustomerView {
        customer_id: row.text("customer_id"),
        status: row.text("status"),
        name: name.text().map(str::to_owned),
        email: email.text().map(str::to_owned),
        personal_data: personal_data.to_owned(),
        registered_at: rfc3339(row.int("registered_at")),
        updated_at: rfc3339(row.int("updated_at")),
        erased_at: row.get("erased_at").int().map(rfc3339),
        version: row.int("version"),
    }))
}

/// The query routes, of the read class.
pub fn router() -> Router<ReadSide> {
    let routes = Router::new()
        .route("/orders", get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/inventory", get(low_stock))
        .route("/inventory/{sku}", get(get_stock))
        .route("/payments/{order_id}", get(get_payment))
        .route("/customers/{id}", get(get_customer));
    http_edge::security::routes(routes, http_edge::security::RouteClass::Read)
}
