//! Authentication, roles, rate limits and request limits.
//!
//! Every route declares its class where it is defined ([`routes`]): the command services'
//! routes are `Command`, the query API's `Read`, the audit routes `Audit`, the saga's retry
//! `Operator`, the probes, `/metrics` and `/openapi.json` `Open` (probes and scrapers carry no
//! keys). No table of paths is kept anywhere else: a request to a route of a class is checked
//! against that class, and a request that matches no route gets 404. [`protect`] wraps a whole
//! server: it enforces the request limits and hands the settings to the routes' checks.
//!
//! Roles: `client` may send commands and read; `operator` may use the operator routes and read;
//! `auditor` may use the audit routes and read. A caller presents an API key
//! (`Authorization: Bearer <key>` or `X-Api-Key: <key>`) or an HS256 JWT bearer token whose
//! `role`/`roles` claim names its roles. No or bad credentials: 401; a role that may not use
//! the route: 403; over the caller's rate: 429 with `Retry-After`. Keys and tokens are never
//! logged: a caller is identified in logs and limits by its token's subject or by a short
//! digest of its key.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::headers::Actor;

/// The cookie a browser presents its console session in (`HttpOnly`, `SameSite=Strict`, path
/// `/console`): the signed session [`Security::open_session`] gave it at sign-in.
pub const CONSOLE_COOKIE: &str = "platform_console";

/// How long a console sign-in lasts.
pub const CONSOLE_SESSION: Duration = Duration::from_secs(8 * 3600);

/// The audience of console sessions: a session is no API token, and an API token no session.
const SESSION_AUDIENCE: &str = "platform-console";

/// Sign-outs one process remembers at most (until their sessions would have ended anyway).
const MAX_SIGNED_OUT: usize = 100_000;

/// The values of every cookie named `name` the request carries, in order.
pub fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(key, _)| *key == name)
        .map(|(_, value)| value.trim())
}

/// The value of the cookie `name` the request carries, if any and not empty.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &'a str) -> Option<&'a str> {
    cookies(headers, name)
        .next()
        .filter(|value| !value.is_empty())
}

/// Longest request target accepted (path and query).
pub const MAX_URI_BYTES: usize = 4096;
/// Largest total size of the request headers accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Callers whose rates are tracked; past it, those whose buckets are full again are forgotten.
const MAX_TRACKED_CALLERS: usize = 100_000;

/// What a route does, for deciding who may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    Open,
    Command,
    Read,
    Operator,
    Audit,
    /// The operator console's pages and actions: operators.
    Console,
    /// The console's audit pages: operators and auditors.
    ConsoleAudit,
}

impl RouteClass {
    pub const ALL: [RouteClass; 7] = [
        RouteClass::Open,
        RouteClass::Command,
        RouteClass::Read,
        RouteClass::Operator,
        RouteClass::Audit,
        RouteClass::Console,
        RouteClass::ConsoleAudit,
    ];

    /// The console's classes, whose callers may present their credentials in the console's
    /// cookie ([`CONSOLE_COOKIE`]) as well as in headers.
    pub fn is_console(self) -> bool {
        matches!(self, RouteClass::Console | RouteClass::ConsoleAudit)
    }

    fn describe(self) -> &'static str {
        match self {
            RouteClass::Open => "open",
            RouteClass::Command => "command",
            RouteClass::Read => "read",
            RouteClass::Operator => "operator",
            RouteClass::Audit => "audit",
            RouteClass::Console => "console",
            RouteClass::ConsoleAudit => "console audit",
        }
    }
}

/// A caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Operator,
    Auditor,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Client, Role::Operator, Role::Auditor];

    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(raw: &str) -> Option<Role> {
        match raw.trim() {
            "client" => Some(Role::Client),
            "operator" => Some(Role::Operator),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    /// May this role use routes of `class`?
    pub fn may(self, class: RouteClass) -> bool {
        matches!(
            (self, class),
            (_, RouteClass::Open)
                | (_, RouteClass::Read)
                | (Role::Client, RouteClass::Command)
                | (Role::Operator, RouteClass::Operator)
                | (Role::Auditor, RouteClass::Audit)
                | (Role::Operator, RouteClass::Console)
                | (Role::Operator, RouteClass::ConsoleAudit)
                | (Role::Auditor, RouteClass::ConsoleAudit)
        )
    }
}

/// Security settings that cannot work (a malformed key, a short secret); the message names the
/// flag and never quotes a secret.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSettings(pub String);

/// A secret from the command line or the environment (`secrecy`): its `Debug` never shows it
/// and its memory is zeroed when dropped.
pub type Secret = secrecy::SecretString;

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

/// Authentication, roles and rate limits (see `security`).
#[derive(Debug, Clone, clap::Args)]
pub struct SecuritySettings {
    /// Require credentials (`on`/`off`). Default: off on the embedded backend (a developer's
    /// machine), on with --kafka or --database-url. /health/*, /metrics and /openapi.json stay
    /// open.
    #[arg(long, env = "PLATFORM_AUTH", value_enum)]
    pub auth: Option<Toggle>,

    /// API keys as `role:key` pairs, comma separated (roles: client, operator, auditor), sent as
    /// `Authorization: Bearer <key>` or `X-Api-Key: <key>`. Never logged.
    #[arg(long, env = "PLATFORM_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<Secret>,

    /// HMAC secret (HS256) of JWT bearer tokens; their `role` (or `roles`) claim names the
    /// role, `sub` the caller, `exp` is required. Never logged.
    #[arg(long, env = "PLATFORM_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// Requests per second each caller (key, token subject, or client address when
    /// authentication is off) may make on average.
    #[arg(long, env = "PLATFORM_RATE_LIMIT", default_value_t = 100.0)]
    pub rate_limit: f64,

    /// Requests a caller may make in a burst above the average rate.
    #[arg(long, env = "PLATFORM_RATE_BURST", default_value_t = 200)]
    pub rate_burst: u32,
}

impl SecuritySettings {
    /// Authentication is on unless turned off, except on the embedded backend.
    pub fn auth_enabled(&self, distributed: bool) -> bool {
        match self.auth {
            Some(toggle) => toggle == Toggle::On,
            None => distributed,
        }
    }
}

impl Default for SecuritySettings {
    fn default() -> Self {
        crate::flag_defaults()
    }
}

/// Who made a request: the caller's id (never a secret) and roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub caller: String,
    pub roles: Vec<Role>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// A console session: who signed in, with which roles, until when. Signed (HS256) with a key
/// derived from the deployment's API keys and JWT secret, so every process of the deployment
/// (and the gateway) accepts it, and changing those secrets ends every session.
#[derive(Debug, serde::Serialize, Deserialize)]
struct SessionClaims {
    sub: String,
    roles: Vec<String>,
    /// When it was signed in (seconds since the epoch), for sign-outs.
    iat: u64,
    exp: u64,
    aud: String,
}

/// What signs and checks console sessions.
struct SessionKeys {
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

impl SessionKeys {
    /// The keys, derived from the deployment's secrets; none without a secret (then no one can
    /// sign in, as no one can authenticate).
    fn derive(settings: &SecuritySettings) -> Option<SessionKeys> {
        let configured = |secret: &Option<Secret>| {
            secret
                .as_ref()
                .is_some_and(|secret| !secret.expose_secret().trim().is_empty())
        };
        if !configured(&settings.api_keys) && !configured(&settings.jwt_secret) {
            return None;
        }
        let mut hasher = Sha256::new();
        hasher.update(b"platform console session\0");
        for secret in [&settings.api_keys, &settings.jwt_secret] {
            let secret = secret
                .as_ref()
                .map(|secret| secret.expose_secret().as_bytes());
            hasher.update((secret.map_or(0, <[u8]>::len) as u64).to_be_bytes());
            hasher.update(secret.unwrap_or_default());
        }
        let key: [u8; 32] = hasher.finalize().into();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.set_audience(&[SESSION_AUDIENCE]);
        validation.leeway = 0;
        Some(SessionKeys {
            encoding: jsonwebtoken::EncodingKey::from_secret(&key),
            decoding: jsonwebtoken::DecodingKey::from_secret(&key),
            validation,
        })
    }
}

/// Each caller's rate (governor's keyed GCRA limiter: a token bucket of `--rate-burst` refilled
/// at `--rate-limit` per second).
type Limiter = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// The layer's state: keys by digest, the JWT key, the callers' rates.
pub struct Security {
    enabled: bool,
    keys: HashMap<[u8; 32], Principal>,
    jwt: Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Validation)>,
    rate: f64,
    burst: u32,
    limiter: Limiter,
    /// Signs and checks the console's sessions; none without a configured secret.
    sessions: Option<SessionKeys>,
    /// Callers who signed out at this process, with when: their sessions opened until then
    /// are refused here. One entry per caller, forgotten once those sessions have expired.
    signed_out: std::sync::Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("enabled", &self.enabled)
            .field("keys", &self.keys.len())
            .field("jwt", &self.jwt.is_some())
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Security {
    /// Parses the settings; `distributed` decides the default of `--auth`.
    pub fn from_settings(
        settings: &SecuritySettings,
        distributed: bool,
    ) -> Result<Self, InvalidSettings> {
        let mut keys: HashMap<[u8; 32], Principal> = HashMap::new();
        if let Some(raw) = &settings.api_keys {
            for (index, pair) in raw.expose_secret().split(',').enumerate() {
                let pair = pair.trim();
                if pair.is_empty() {
                    continue;
                }
                // The error never quotes the pair: it holds a key.
                let (role, key) = pair.split_once(':').ok_or_else(|| {
                    InvalidSettings(format!("--api-keys entry {} is not role:key", index + 1))
                })?;
                let role = Role::parse(role).ok_or_else(|| {
                    InvalidSettings(format!(
                        "--api-keys entry {}: unknown role {role:?} (client, operator, auditor)",
                        index + 1
                    ))
                })?;
                let key = key.trim();
                if key.len() < 16 {
                    return Err(InvalidSettings(format!(
                        "--api-keys entry {}: a key needs at least 16 characters",
                        index + 1
                    )));
                }
                let hash = digest(key);
                let caller = format!(
                    "key:{}",
                    hash[..4]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                );
                // The caller id names the key in logs, limits and console sessions: two keys
                // must not share one.
                if keys
                    .iter()
                    .any(|(other, principal)| *other != hash && principal.caller == caller)
                {
                    return Err(InvalidSettings(format!(
                        "--api-keys entry {}: its key's id {caller} is another key's too; change one of them",
                        index + 1
                    )));
                }
                let principal = keys.entry(hash).or_insert_with(|| Principal {
                    caller,
                    roles: Vec::new(),
                });
                if !principal.roles.contains(&role) {
                    principal.roles.push(role);
                }
            }
        }
        let jwt = match &settings.jwt_secret {
            Some(secret) if !secret.expose_secret().is_empty() => {
                if secret.expose_secret().len() < 32 {
                    return Err(InvalidSettings(
                        "--jwt-secret needs at least 32 bytes".to_owned(),
                    ));
                }
                let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
                validation.set_required_spec_claims(&["exp", "sub"]);
                Some((
                    jsonwebtoken::DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                    validation,
                ))
            }
            _ => None,
        };
        let burst = NonZeroU32::new(settings.rate_burst);
        let period = (settings.rate_limit.is_finite() && settings.rate_limit > 0.0)
            .then(|| {
                Duration::from_secs_f64(1.0 / settings.rate_limit).max(Duration::from_nanos(1))
            })
            .and_then(Quota::with_period);
        let (Some(burst), Some(quota)) = (burst, period) else {
            return Err(InvalidSettings(
                "--rate-limit and --rate-burst must be positive".to_owned(),
            ));
        };
        let enabled = settings.auth_enabled(distributed);
        if enabled && keys.is_empty() && jwt.is_none() {
            tracing::warn!(
                "authentication is on but no --api-keys or --jwt-secret is set: every protected route answers 401"
            );
        }
        Ok(Security {
            enabled,
            keys,
            jwt,
            rate: settings.rate_limit,
            burst: burst.get(),
            limiter: RateLimiter::keyed(quota.allow_burst(burst)),
            sessions: SessionKeys::derive(settings),
            signed_out: std::sync::Mutex::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn credential(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let value = value
                .to_str()
                .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .ok_or_else(|| {
                    ApiError::Unauthorized("the Authorization scheme must be Bearer".into())
                })?;
            return Ok(Some(token.trim()));
        }
        match headers.get("x-api-key") {
            Some(value) => value
                .to_str()
                .map(|key| Some(key.trim()))
                .map_err(|_| ApiError::Unauthorized("malformed X-Api-Key header".into())),
            None => Ok(None),
        }
    }

    /// Signs a browser in to the console: checks `token` (an API key or JWT) as the API would
    /// and returns the session for its cookie. The session names the caller and its roles,
    /// never the key, and lasts [`CONSOLE_SESSION`].
    pub fn open_session(&self, token: &str) -> Result<String, ApiError> {
        let (principal, token_expires) = self.verify_until(token)?;
        let keys = self.sessions.as_ref().ok_or_else(|| {
            ApiError::Unauthorized(
                "no --api-keys or --jwt-secret is set: no one can sign in".into(),
            )
        })?;
        let now = jsonwebtoken::get_current_timestamp();
        // A session from a token ends when the token does, if that is sooner.
        let exp = (now + CONSOLE_SESSION.as_secs()).min(token_expires.unwrap_or(u64::MAX));
        let claims = SessionClaims {
            sub: principal.caller,
            roles: principal
                .roles
                .iter()
                .map(|role| role.name().to_owned())
                .collect(),
            iat: now,
            exp,
            aud: SESSION_AUDIENCE.to_owned(),
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &keys.encoding,
        )
        .map_err(|error| ApiError::Internal(format!("signing a console session: {error}")))
    }

    fn session_claims(&self, session: &str) -> Result<SessionClaims, ApiError> {
        let ended = || {
            ApiError::Unauthorized(
                "the console session has ended or is not valid: sign in again".into(),
            )
        };
        let keys = self.sessions.as_ref().ok_or_else(ended)?;
        jsonwebtoken::decode::<SessionClaims>(session, &keys.decoding, &keys.validation)
            .map(|data| data.claims)
            .map_err(|_| ended())
    }

    /// Signs a console session's caller out: this process refuses every session of that
    /// caller opened until now (the browser drops its cookie; other processes accept the
    /// session until it expires).
    pub fn close_session(&self, session: &str) {
        let Ok(claims) = self.session_claims(session) else {
            return;
        };
        let now = jsonwebtoken::get_current_timestamp();
        let mut signed_out = self
            .signed_out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if signed_out.len() >= MAX_SIGNED_OUT {
            // Sessions opened before a sign-out more than a session's length ago have expired.
            signed_out.retain(|_, at| *at + CONSOLE_SESSION.as_secs() > now);
        }
        if signed_out.len() < MAX_SIGNED_OUT || signed_out.contains_key(&claims.sub) {
            signed_out.insert(claims.sub, now);
        }
    }

    /// Who a console session names. A key's session takes the key's roles as configured now:
    /// a key removed from `--api-keys` ends its sessions.
    fn session(&self, session: &str) -> Result<Principal, ApiError> {
        let claims = self.session_claims(session)?;
        let ended = || {
            ApiError::Unauthorized(
                "the console session has ended or is not valid: sign in again".into(),
            )
        };
        let signed_out = self
            .signed_out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&claims.sub)
            .is_some_and(|at| claims.iat <= *at);
        if signed_out {
            return Err(ended());
        }
        if claims.sub.starts_with("key:") {
            return self
                .keys
                .values()
                .find(|principal| principal.caller == claims.sub)
                .cloned()
                .ok_or_else(ended);
        }
        Ok(Principal {
            caller: claims.sub,
            roles: claims
                .roles
                .iter()
                .filter_map(|role| Role::parse(role))
                .collect(),
        })
    }

    /// The console's cookie in `headers`, if any.
    pub fn console_cookie(headers: &HeaderMap) -> Option<&str> {
        cookie(headers, CONSOLE_COOKIE)
    }

    /// Who the request's credentials name.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let token = Self::credential(headers)?.ok_or_else(|| {
            ApiError::Unauthorized(
                "credentials required: Authorization: Bearer <API key or token>".into(),
            )
        })?;
        self.verify(token)
    }

    /// Who `token` (an API key or a JWT) names.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        self.verify_until(token).map(|(principal, _)| principal)
    }

    /// Who `token` names, and when it expires (a JWT's `exp`; a key does not).
    fn verify_until(&self, token: &str) -> Result<(Principal, Option<u64>), ApiError> {
        if let Some(principal) = self.keys.get(&digest(token)) {
            return Ok((principal.clone(), None));
        }
        if token.split('.').count() == 3
            && let Some((key, validation)) = &self.jwt
        {
            let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|error| {
                ApiError::Unauthorized(format!("the bearer token is not valid: {error}"))
            })?;
            let claims = data.claims;
            let roles: Vec<Role> = claims
                .role
                .iter()
                .chain(claims.roles.iter())
                .filter_map(|role| Role::parse(role))
                .collect();
            if roles.is_empty() {
                return Err(ApiError::Forbidden(
                    "the token names no role (client, operator, auditor)".into(),
                ));
            }
            return Ok((
                Principal {
                    caller: format!("jwt:{}", claims.sub),
                    roles,
                },
                claims.exp,
            ));
        }
        Err(ApiError::Unauthorized("unknown API key or token".into()))
    }

    /// Takes one token from `caller`'s bucket, or says how long to wait.
    pub fn take(&self, caller: &str) -> Result<(), ApiError> {
        if self.limiter.len() >= MAX_TRACKED_CALLERS {
            // Forget the callers whose buckets are full again: they start full anyway.
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&caller.to_owned())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                ApiError::TooManyRequests {
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                }
            })
    }

    /// The request limits every request is held to, whatever its route.
    pub fn limits(uri: &axum::http::Uri, headers: &HeaderMap) -> Result<(), ApiError> {
        let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if target > MAX_URI_BYTES {
            return Err(ApiError::UriTooLong(MAX_URI_BYTES));
        }
        let header_bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if header_bytes > MAX_HEADER_BYTES {
            return Err(ApiError::HeadersTooLarge(MAX_HEADER_BYTES));
        }
        Ok(())
    }

    /// May the request's caller use a route of `class`? When authentication is on: its
    /// credentials, its role and its rate; the caller, when there is one.
    pub fn admit(
        &self,
        class: RouteClass,
        headers: &HeaderMap,
    ) -> Result<Option<Principal>, ApiError> {
        if !self.enabled || class == RouteClass::Open {
            return Ok(None);
        }
        // A browser's console session counts for the console's routes only (a cookie would open
        // the API's to cross-site requests), and only without credentials in headers.
        let session = if class.is_console() && Self::credential(headers)?.is_none() {
            Self::console_cookie(headers)
        } else {
            None
        };
        let principal = match session {
            Some(session) => self.session(session)?,
            None => self.authenticate(headers)?,
        };
        if !principal.roles.iter().any(|role| role.may(class)) {
            return Err(ApiError::Forbidden(format!(
                "{} routes need another role than {:?}",
                class.describe(),
                principal.roles
            )));
        }
        self.take(&principal.caller)?;
        Ok(Some(principal))
    }

    /// Admits `request` to a route of `class` ([`Security::admit`]) and puts its caller in it:
    /// the [`Principal`], and the [`Actor`] of the commands it sends (which also scopes its
    /// idempotency keys).
    pub fn authorize(&self, class: RouteClass, request: &mut Request) -> Result<(), ApiError> {
        if let Some(principal) = self.admit(class, request.headers())? {
            tracing::debug!(caller = %principal.caller, "authenticated");
            request
                .extensions_mut()
                .insert(Actor(principal.caller.clone()));
            request.extensions_mut().insert(principal);
        }
        Ok(())
    }
}

/// The server-wide middleware ([`protect`]): the request limits, and the settings for the
/// routes' checks.
async fn layer(
    State(security): State<Arc<Security>>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Err(error) = Security::limits(request.uri(), request.headers()) {
        return error.into_response();
    }
    request.extensions_mut().insert(security);
    next.run(request).await
}

/// Wraps a whole server (all its routes) in the security layer.
pub fn protect(router: axum::Router, security: Arc<Security>) -> axum::Router {
    router.layer(axum::middleware::from_fn_with_state(security, layer))
}

/// Declares that the routes of `router` are of `class`: each request to one of them is
/// admitted or refused for that class (credentials, role, rate) before its handler runs, and
/// its answer carries the class (the command metrics count the `Command` ones).
pub fn routes<S>(router: axum::Router<S>, class: RouteClass) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    if !router.has_routes() {
        // A part without such routes (a process that runs none of the command services).
        return router;
    }
    router.route_layer(axum::middleware::from_fn_with_state(class, require))
}

/// The check of a route of a declared class.
async fn require(State(class): State<RouteClass>, mut request: Request, next: Next) -> Response {
    let mut response = match request.extensions().get::<Arc<Security>>().cloned() {
        // A route served outside `protect` is a server built wrongly: refuse, never open.
        None => ApiError::Internal(format!(
            "a {} route is served without the security layer",
            class.describe()
        ))
        .into_response(),
        Some(security) => match security.authorize(class, &mut request) {
            Ok(()) => next.run(request).await,
            Err(error) => error.into_response(),
        },
    };
    response.extensions_mut().insert(class);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_role_colon_key_and_are_never_quoted_in_errors() {
        let settings = SecuritySettings {
            api_keys: Some(Secret::from("client-key-that-is-long")),
            ..SecuritySettings::default()
        };
        let error = Security::from_settings(&settings, true).expect_err("no role");
        assert!(!error.to_string().contains("client-key"), "{error}");
        let settings = SecuritySettings {
            api_keys: Some(Secret::from("admin:supersecretkey-123456")),
            ..SecuritySettings::default()
        };
        let error = Security::from_settings(&settings, true).expect_err("unknown role");
        assert!(!error.to_string().contains("supersecret"), "{error}");
    }

    fn console_headers(session: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("{CONSOLE_COOKIE}={session}")
                .parse()
                .expect("header"),
        );
        headers
    }

    #[test]
    fn without_a_secret_no_session_is_accepted_not_even_one_signed_with_the_empty_derivation() {
        let settings = SecuritySettings {
            auth: Some(Toggle::On),
            ..SecuritySettings::default()
        };
        let security = Security::from_settings(&settings, true).expect("settings");
        // The key an empty configuration would derive, were sessions allowed.
        let mut hasher = Sha256::new();
        hasher.update(b"platform console session\0");
        hasher.update(0u64.to_be_bytes());
        hasher.update(0u64.to_be_bytes());
        let key: [u8; 32] = hasher.finalize().into();
        let now = jsonwebtoken::get_current_timestamp();
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &SessionClaims {
                sub: "jwt:mallory".into(),
                roles: vec!["operator".into()],
                iat: now,
                exp: now + 3600,
                aud: SESSION_AUDIENCE.into(),
            },
            &jsonwebtoken::EncodingKey::from_secret(&key),
        )
        .expect("sign");
        assert!(
            security
                .admit(RouteClass::Console, &console_headers(&forged))
                .is_err()
        );
    }

    #[test]
    fn a_session_from_a_token_ends_with_the_token_and_a_sign_out_ends_the_caller_s_sessions() {
        let secret = "a-jwt-secret-of-at-least-32-bytes-long";
        let settings = SecuritySettings {
            auth: Some(Toggle::On),
            jwt_secret: Some(Secret::from(secret)),
            ..SecuritySettings::default()
        };
        let security = Security::from_settings(&settings, true).expect("settings");
        let now = jsonwebtoken::get_current_timestamp();
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": "alice", "role": "operator", "exp": now + 60}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign");
        let session = security.open_session(&token).expect("a session");
        let claims = security.session_claims(&session).expect("claims");
        assert!(claims.exp <= now + 60, "the session outlives the token");
        assert!(
            security
                .admit(RouteClass::Console, &console_headers(&session))
                .is_ok()
        );
        // The session is no API credential.
        let mut bearer = HeaderMap::new();
        bearer.insert(
            header::AUTHORIZATION,
            format!("Bearer {session}").parse().expect("header"),
        );
        assert!(security.admit(RouteClass::Operator, &bearer).is_err());
        security.close_session(&session);
        assert!(
            security
                .admit(RouteClass::Console, &console_headers(&session))
                .is_err(),
            "signed out"
        );
    }

    #[test]
    fn a_bucket_refills_at_the_rate() {
        let settings = SecuritySettings {
            rate_limit: 1000.0,
            rate_burst: 2,
            ..SecuritySettings::default()
        };
        let security = Security::from_settings(&settings, true).expect("settings");
        assert!(security.take("a").is_ok());
        assert!(security.take("a").is_ok());
        assert!(matches!(
            security.take("a"),
            Err(ApiError::TooManyRequests {
                retry_after_secs: 1
            })
        ));
        assert!(security.take("b").is_ok(), "buckets are per caller");
        std::thread::sleep(Duration::from_millis(5));
        assert!(security.take("a").is_ok(), "refilled");
    }
}
