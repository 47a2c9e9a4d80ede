//! The customer routes: register, change the email address, erase.
//!
//! Personal fields are sealed here, with the customer's data key from the key store, before the
//! command reaches the owner: the log and everything derived from it only ever hold them sealed
//! (see `personal_data`). An erasure clears the key first and then appends `customer.erased`, so
//! the data is unreadable as soon as the key store has committed, whatever happens next; a
//! retried erasure finishes what a failed one began.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{patch, post};
use domain::customer::{CustomerAggregate, CustomerCommand, CustomerError, CustomerState};
use domain::{Aggregate, CustomerId};
use personal_data::{KeyError, KeyState, KeyStore, fingerprint, seal};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::CommandState;
use crate::http::commands::{CommandAccepted, accepted, command_error, describe};
use crate::owner::{CommandRequest, Owner};
use http_edge::error::{ApiError, FieldError, Problem};
use http_edge::extract::ApiJson;
use http_edge::headers::CommandHeaders;
use http_edge::security::{self, RouteClass};

/// The longest name kept, in characters.
pub const MAX_NAME_LEN: usize = 200;
/// The longest email address (RFC 5321's limit on a path), in characters.
pub const MAX_EMAIL_LEN: usize = 254;

/// `POST /customers`
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterCustomerRequest {
    /// The customer's name: 1 to 200 characters, at least one not white space, no control
    /// characters (sealed before it is stored).
    #[schema(schema_with = name_schema, example = "Ada Lovelace")]
    pub name: String,
    /// An email address order updates are sent to (sealed before it is stored).
    #[schema(schema_with = email_schema, example = "ada@example.com")]
    pub email: String,
}

/// `PATCH /customers/{id}`: the fields to change.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeCustomerRequest {
    /// The new email address (sealed before it is stored).
    #[schema(schema_with = email_schema, example = "ada@example.org")]
    pub email: String,
}

/// A name, for the OpenAPI document: what [`name`] takes.
fn name_schema() -> utoipa::openapi::schema::Schema {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_NAME_LEN))
        .pattern(Some(
            "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$",
        ))
        .into()
}

/// An email address, for the OpenAPI document: what [`email`] takes.
fn email_schema() -> utoipa::openapi::schema::Schema {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Email,
        )))
        .min_length(Some(3))
        .max_length(Some(MAX_EMAIL_LEN))
        .into()
}

/// Personal fields are never printed.
impl std::fmt::Debug for RegisterCustomerRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegisterCustomerRequest { .. }")
    }
}

impl std::fmt::Debug for ChangeCustomerRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeCustomerRequest { .. }")
    }
}

fn name(raw: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    let name = raw.trim();
    if name.is_empty() {
        errors.push(FieldError::new("name", "must not be empty"));
        return None;
    }
    if name.chars().count() > MAX_NAME_LEN {
        errors.push(FieldError::new(
            "name",
            format!("must be at most {MAX_NAME_LEN} characters"),
        ));
        return None;
    }
    if name.chars().any(char::is_control) {
        errors.push(FieldError::new(
            "name",
            "must not contain control characters",
        ));
        return None;
    }
    Some(name.to_owned())
}

fn email(raw: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    let email = raw.trim();
    if email.chars().count() > MAX_EMAIL_LEN {
        errors.push(FieldError::new(
            "email",
            format!("must be at most {MAX_EMAIL_LEN} characters"),
        ));
        return None;
    }
    // An address an SMTP relay takes: no display name, no spaces or controls.
    if !email_address::EmailAddress::is_valid(email)
        || email.contains('<')
        || email.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        errors.push(FieldError::new(
            "email",
            "must be an email address (name@domain)",
        ));
        return None;
    }
    Some(email.to_owned())
}

fn customer_id(raw: &str) -> Result<CustomerId, ApiError> {
    CustomerId::parse(raw).map_err(|_| ApiError::NotFound(format!("customer {raw} does not exist")))
}

fn customer_error(error: CustomerError) -> ApiError {
    match error {
        CustomerError::NotRegistered => ApiError::NotFound(error.to_string()),
        CustomerError::AlreadyRegistered | CustomerError::Erased => {
            ApiError::Conflict(error.to_string())
        }
    }
}

fn key_error(customer: &CustomerId, error: KeyError) -> ApiError {
    match error {
        KeyError::Erased(_) => ApiError::Conflict(format!("customer {customer} was erased")),
        other => ApiError::Unavailable(other.to_string()),
    }
}

fn parts(state: &CommandState) -> Result<(&Owner<CustomerAggregate>, &KeyStore), ApiError> {
    match (&state.customers, &state.keys) {
        (Some(owner), Some(keys)) => Ok((owner, keys)),
        _ => Err(ApiError::Unavailable(
            "the customer service does not run in this process".into(),
        )),
    }
}

async fn run(
    owner: &Owner<CustomerAggregate>,
    customer: &CustomerId,
    command: CustomerCommand,
    headers: &CommandHeaders,
    fingerprint: String,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let request = CommandRequest {
        aggregate_id: customer.to_string(),
        command,
        meta: headers.meta("customer", &fingerprint),
        expected_version: headers.expected_version,
    };
    let outcome = owner
        .execute(request)
        .await
        .map_err(|error| command_error(error, customer_error))?;
    let body = CommandAccepted {
        aggregate_type: CustomerAggregate::TYPE.to_owned(),
        aggregate_id: customer.to_string(),
        order_id: None,
        sku: None,
        customer_id: Some(customer.to_string()),
        version: outcome.version(),
        consistency_token: outcome.position().map(ToString::to_string),
        outcome: describe(&outcome).to_owned(),
    };
    Ok(accepted(status, body, headers))
}

/// Register a customer; the name and email address are stored only sealed with the customer's
/// own data key.
#[utoipa::path(
    post, path = "/customers", tag = "customers",
    params(crate::http::commands::CommandHeaderDocs),
    request_body = RegisterCustomerRequest,
    responses(
        (status = 201, description = "Customer registered", body = CommandAccepted),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The customer exists already or was erased (a retried idempotency key after an erasure)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or idempotency key reused with another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Log or key store unavailable, or not ready", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn register_customer(
    State(state): State<CommandState>,
    headers: CommandHeaders,
    ApiJson(body): ApiJson<RegisterCustomerRequest>,
) -> Result<Response, ApiError> {
    let (owner, keys) = parts(&state)?;
    let mut errors = Vec::new();
    let name = name(&body.name, &mut errors);
    let email = email(&body.email, &mut errors);
    let (Some(name), Some(email)) = (name, email) else {
        return Err(ApiError::Validation(errors));
    };
    let customer = CustomerId::parse(&headers.new_id("customer-id").to_string())
        .map_err(|error| ApiError::Unavailable(format!("a new customer id: {error}")))?;
    // On disk before anything sealed with it is appended.
    let key = keys
        .key_for_registration(&customer)
        .await
        .map_err(|error| key_error(&customer, error))?;
    let fingerprint = format!(
        "POST /customers\n{}",
        fingerprint(&key, &format!("{name}\n{email}"))
    );
    let command = CustomerCommand::Register {
        customer_id: customer.clone(),
        name: seal(&key, &customer, "name", &name),
        email: seal(&key, &customer, "email", &email),
    };
    run(
        owner,
        &customer,
        command,
        &headers,
        fingerprint,
        StatusCode::CREATED,
    )
    .await
}

/// Change a customer's email address.
#[utoipa::path(
    patch, path = "/customers/{id}", tag = "customers",
    params(("id" = String, Path, description = "The customer id"), crate::http::commands::CommandHeaderDocs),
    request_body = ChangeCustomerRequest,
    responses(
        (status = 200, description = "Email address changed", body = CommandAccepted),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such customer", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The customer was erased, or version conflict", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, or idempotency key reused with another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Log or key store unavailable, or not ready", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn change_customer(
    State(state): State<CommandState>,
    Path(raw_id): Path<String>,
    headers: CommandHeaders,
    ApiJson(body): ApiJson<ChangeCustomerRequest>,
) -> Result<Response, ApiError> {
    let (owner, keys) = parts(&state)?;
    let customer = customer_id(&raw_id)?;
    let mut errors = Vec::new();
    let Some(email) = email(&body.email, &mut errors) else {
        return Err(ApiError::Validation(errors));
    };
    let key = match keys
        .key(&customer)
        .await
        .map_err(|error| key_error(&customer, error))?
    {
        KeyState::Live(key) => key,
        KeyState::Erased { .. } => {
            return Err(ApiError::Conflict(format!(
                "customer {customer} was erased"
            )));
        }
        KeyState::Unknown => {
            return Err(ApiError::NotFound(format!(
                "customer {customer} does not exist"
            )));
        }
    };
    let fingerprint = format!("PATCH /customers/{customer}\n{}", fingerprint(&key, &email));
    let command = CustomerCommand::ChangeEmail {
        email: seal(&key, &customer, "email", &email),
    };
    run(
        owner,
        &customer,
        command,
        &headers,
        fingerprint,
        StatusCode::OK,
    )
    .await
}

/// Erase a customer (GDPR article 17): their data key is deleted, so every sealed copy of their
/// personal fields (the log and its copies, snapshots, read models) is unreadable from then on,
/// and `customer.erased` tells every reader. Repeating it changes nothing.
#[utoipa::path(
    post, path = "/customers/{id}/erase", tag = "customers",
    params(("id" = String, Path, description = "The customer id"), crate::http::commands::CommandHeaderDocs),
    responses(
        (status = 200, description = "Customer erased (or erased before)", body = CommandAccepted),
        (status = 400, description = "Malformed header", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such customer", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Version conflict", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Idempotency key reused with another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Log or key store unavailable, or not ready", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn erase_customer(
    State(state): State<CommandState>,
    Path(raw_id): Path<String>,
    headers: CommandHeaders,
) -> Result<Response, ApiError> {
    let (owner, keys) = parts(&state)?;
    let customer = customer_id(&raw_id)?;
    // Only a customer the owner knows is erased; an unknown id changes nothing, not even the
    // key store. (An owner that does not decide for the partition refuses below, key intact.)
    owner
        .decides_for(customer.as_str())
        .map_err(|error| command_error(error, customer_error))?;
    if matches!(
        owner.state(customer.as_str()).0,
        CustomerState::NotRegistered
    ) {
        return Err(ApiError::NotFound(format!(
            "customer {customer} does not exist"
        )));
    }
    keys.erase(&customer)
        .await
        .map_err(|error| key_error(&customer, error))?;
    let fingerprint = format!("POST /customers/{customer}/erase");
    run(
        owner,
        &customer,
        CustomerCommand::Erase,
        &headers,
        fingerprint,
        StatusCode::OK,
    )
    .await
}

/// The customer routes, when the customer service runs in this process; all of the command class.
pub fn router(state: &CommandState) -> Router<CommandState> {
    let mut router = Router::new();
    if state.customers.is_some() {
        router = router
            .route("/customers", post(register_customer))
            .route("/customers/{id}", patch(change_customer))
            .route("/customers/{id}/erase", post(erase_customer));
    }
    security::routes(router, RouteClass::Command)
}
