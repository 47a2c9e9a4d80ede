//! The operator console, served at `/console` by the process that runs the parts it shows:
//! server-rendered pages (askama templates in `templates/`, compiled into the binary) with htmx
//! (vendored in `static/`, served by the platform) for the overview's live refresh. No build
//! step, no CDN.
//!
//! - `/console`: charts of the last 10 minutes (events appended/s, sagas finished/s, sagas in
//!   flight by state), sagas by state, those needing attention or stuck, projection lag and
//!   parked events; measured in the background by [`Console::start`]'s sampler and refreshed
//!   in the browser every 2 s;
//! - `/console/sagas`, `/console/sagas/{order_id}`: sagas by state, stuck-for and time, paged;
//!   one saga's steps, compensations marked, its order, payment and stock, and a retry of a
//!   parked step (the operation of `POST /sagas/{order_id}/retry`);
//! - `/console/projections`: lag per projection and partition, parked events with retry and
//!   skip (the operations of `platform parked`);
//! - `/console/audit`: search by order id, SKU, payment or correlation id; an aggregate's
//!   timeline and its state as of a version or time; a correlation's flow as a causation tree.
//!
//! Access follows the platform's roles: operators may use every page (class
//! [`RouteClass::Console`]), auditors the audit pages ([`RouteClass::ConsoleAudit`]), clients
//! none. With authentication on, a browser signs in at `/console/login` with an API key or
//! token; it gets a signed session (8 hours at most; caller and roles, never the key) in an
//! `HttpOnly`, `SameSite=Strict` cookie that only the console's routes accept. Every process of
//! the deployment and the gateway accept the session: it is signed with a key derived from the
//! deployment's API keys and JWT secret. Signing out removes the cookie and ends the caller's
//! sessions at the process that served the sign-out.
//! Every action is a POST carrying a token that must equal the one in the console's own
//! `SameSite=Strict` cookie (double submit), so another site cannot make a browser act; every
//! page is `Cache-Control: no-store`.

mod chart;

use std::time::Duration;

use askama::Template;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use http_edge::headers::Actor;
use http_edge::security::{CONSOLE_COOKIE, RouteClass, Security, cookie, cookies, routes};
use projections::ReadSide;
use projections::audit::{self, AsOf, AuditError, Timeline, Trace};
use projections::parked::{self, ParkedEvent, Resolution};
use projections::read_side::PartitionLag;
use saga_orchestrator::SagaState;
use saga_orchestrator::driver::{self, SagaSummary};
use saga_orchestrator::side::SagaSide;
use serde::Deserialize;

/// The cookie holding the console's anti-forgery token.
const CSRF_COOKIE: &str = "console_csrf";

/// How long unchanged an unfinished saga must be for the overview to call it stuck.
const STUCK_MINUTES: u64 = 5;

/// How often the sampler measures the overview while someone looks at it (a request within
/// [`VIEWED_FOR`]): open tabs refresh every 2 s, and however many there are, the sagas are
/// counted and the projections' lag measured once a second.
const MEASURE_VIEWED: Duration = Duration::from_secs(1);

/// How long after its last request the overview counts as looked at.
const VIEWED_FOR: Duration = Duration::from_secs(10);

/// How long a first request waits for the sampler's first measurement before measuring itself.
const FIRST_MEASUREMENT: Duration = Duration::from_secs(5);

/// How old the sampler's overview may be before a request measures anew (the sampler failing,
/// say, because a database did not answer): one request at a time, the others wait for it.
const STALE: Duration = Duration::from_secs(30);

/// The overview's charts: the last 10 minutes in 10-second intervals.
const CHART_INTERVAL_MS: i64 = 10_000;
const CHART_INTERVALS: usize = 60;

/// How often the sampler measures the overview (and so samples the log's end and the sagas
/// for the charts) when no one looks at it: the charts' interval, so that each interval has a
/// figure.
const SAMPLE_EVERY: Duration = Duration::from_millis(CHART_INTERVAL_MS as u64);

/// The saga states the chart of sagas in flight stacks, with their CSS class.
const IN_FLIGHT: [(&str, &str); 5] = [
    ("reserving_stock", "s-busy"),
    ("authorising_payment", "s-ok"),
    ("confirming", "s-done"),
    ("compensating", "s-undo"),
    ("needs_attention", "s-alert"),
];

/// The states a saga rests in once it has finished (or until a shipment or cancellation).
const FINISHED: [&str; 4] = ["confirmed", "completed", "rejected", "cancelled"];

/// Parked events listed per projection; the page says how many more there are.
const PARKED_SHOWN: usize = 100;

/// What the console shows: the parts this process runs.
#[derive(Debug, Clone)]
pub struct Console {
    read: Option<ReadSide>,
    saga: Option<SagaSide>,
    /// The sampler's latest overview and when it was measured. Requests answer with it and
    /// never wait for a measurement (counting sagas by state reads every saga's index entry:
    /// tens of milliseconds at 100,000 sagas, hundreds right after a burst of writes on
    /// Postgres, before vacuum has marked the pages visible); its "As of" says its age.
    overview: tokio::sync::watch::Sender<Option<(std::time::Instant, String)>>,
    /// When the overview was last requested (ms since the epoch), and what wakes the sampler
    /// when a request finds it older than [`MEASURE_VIEWED`].
    viewed_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    /// Held by the one request measuring the overview itself (see [`STALE`]).
    measuring: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The charts' samples, oldest first, as far back as the charts reach.
    samples: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Sample>>>,
}

/// What the console saw at one moment: how many events the log held (every aggregate's
/// topics), and how many sagas were in each state.
#[derive(Debug, Clone)]
struct Sample {
    at_ms: i64,
    events: Option<u64>,
    sagas: Option<Vec<(String, i64)>>,
}

impl Console {
    pub fn new(read: Option<ReadSide>, saga: Option<SagaSide>) -> Console {
        Console {
            read,
            saga,
            overview: tokio::sync::watch::Sender::new(None),
            viewed_ms: Default::default(),
            wake: Default::default(),
            measuring: Default::default(),
            samples: Default::default(),
        }
    }

    /// Measures the overview (sagas by state, stuck sagas, projection lag; a sample of the
    /// log's end and the sagas for the charts) under `supervisor` (`console sampler`) until
    /// `shutdown`: every second while someone looks at the overview, every 10 s
    /// otherwise, and at once when a request finds the last one stale.
    pub fn start(
        &self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        supervisor: &supervisor::Supervisor,
    ) {
        let console = self.clone();
        supervisor.spawn("console sampler", async move {
            loop {
                match measure_overview(&console).await {
                    Ok(body) => {
                        console
                            .overview
                            .send_replace(Some((std::time::Instant::now(), body)));
                    }
                    Err(error) => tracing::debug!(?error, "the console's measurement failed"),
                }
                let viewed = Utc::now().timestamp_millis()
                    - console.viewed_ms.load(std::sync::atomic::Ordering::Relaxed)
                    < VIEWED_FOR.as_millis() as i64;
                let next = if viewed { MEASURE_VIEWED } else { SAMPLE_EVERY };
                tokio::select! {
                    _ = tokio::time::sleep(next) => {}
                    _ = console.wake.notified(), if !viewed => {}
                    _ = shutdown.wait_for(|stopped| *stopped) => return,
                }
            }
        });
    }

    fn record(&self, sample: Sample) {
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let horizon = sample.at_ms - CHART_INTERVAL_MS * (CHART_INTERVALS as i64 + 1);
        while samples.front().is_some_and(|oldest| oldest.at_ms < horizon) {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The overview's charts from the samples.
    fn charts(&self) -> Vec<chart::Chart> {
        let samples: Vec<Sample> = self
            .samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect();
        let window = chart::Window::ending_at(Utc::now(), CHART_INTERVAL_MS, CHART_INTERVALS);
        // A figure between two samples belongs to the interval of the later one.
        let interval_of = |at_ms: i64| at_ms.div_euclid(CHART_INTERVAL_MS) * CHART_INTERVAL_MS;
        let mut charts = Vec::new();
        if self.read.is_some() {
            let points: Vec<(i64, &str, i64)> = samples
                .windows(2)
                .filter_map(|pair| {
                    let appended = pair[1].events?.checked_sub(pair[0].events?)?;
                    Some((interval_of(pair[1].at_ms), "events", appended as i64))
                })
                .collect();
            charts.push(chart::stacked(
                "Events appended per second (each decided command appends one or more)",
                window,
                &[("events", "s-busy")],
                &points,
                chart::Figures::Rates,
            ));
        }
        if self.saga.is_some() {
            let finished = |sample: &Sample| -> Option<i64> {
                Some(
                    sample
                        .sagas
                        .as_ref()?
                        .iter()
                        .filter(|(state, _)| FINISHED.contains(&state.as_str()))
                        .map(|(_, count)| count)
                        .sum(),
                )
            };
            let points: Vec<(i64, &str, i64)> = samples
                .windows(2)
                .filter_map(|pair| {
                    let more = finished(&pair[1])? - finished(&pair[0])?;
                    Some((interval_of(pair[1].at_ms), "finished", more.max(0)))
                })
                .collect();
            charts.push(chart::stacked(
                "Sagas finished per second (confirmed, completed, rejected or cancelled)",
                window,
                &[("finished", "s-ok")],
                &points,
                chart::Figures::Rates,
            ));
            let mut levels: Vec<(i64, &str, i64)> = Vec::new();
            for sample in &samples {
                let Some(sagas) = &sample.sagas else { continue };
                for (state, _) in IN_FLIGHT {
                    let count = sagas
                        .iter()
                        .find(|(name, _)| name == state)
                        .map_or(0, |(_, count)| *count);
                    levels.push((interval_of(sample.at_ms), state, count));
                }
            }
            charts.push(chart::stacked(
                "Sagas in flight, by state",
                window,
                &IN_FLIGHT,
                &levels,
                chart::Figures::Levels,
            ));
        }
        charts
    }
}

/// The console's routes, each declaring its class, and its static files (open).
pub fn router<S: Clone + Send + Sync + 'static>(console: Console) -> Router<S> {
    let operator = Router::new()
        .route("/console", get(overview))
        .route("/console/overview", get(overview_fragment))
        .route("/console/sagas", get(sagas))
        .route("/console/sagas/{order_id}", get(saga))
        .route("/console/sagas/{order_id}/retry", post(retry_saga))
        .route("/console/projections", get(projections_page))
        .route("/console/parked", post(resolve_parked));
    let audit = Router::new()
        .route("/console/audit", get(audit_search))
        .route("/console/audit/{aggregate_type}/{id}", get(aggregate));
    let open = Router::new()
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/static/htmx.min.js", get(htmx))
        .route("/console/static/console.css", get(css));
    let pages = routes(operator, RouteClass::Console)
        .merge(routes(audit, RouteClass::ConsoleAudit))
        .layer(axum::middleware::from_fn(pages));
    pages
        .merge(routes(open, RouteClass::Open))
        .with_state(console)
}

// ---------------------------------------------------------------------------------------------
// Page plumbing: anti-forgery token, no caching, sign-in for browsers

/// The anti-forgery token of this browser, for the page's forms.
#[derive(Debug, Clone)]
struct Csrf(String);

/// Around every console page and action: hands the page this browser's anti-forgery token
/// (made and set as a cookie when it has none), keeps answers out of every cache, and sends a
/// browser that is not signed in to the sign-in page.
async fn pages(mut request: Request, next: Next) -> Response {
    let existing = cookie(request.headers(), CSRF_COOKIE)
        .filter(|token| token.len() == 32 && token.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_owned);
    let token = existing
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    request.extensions_mut().insert(Csrf(token.clone()));
    let is_get = request.method() == axum::http::Method::GET;
    let mut response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED && is_get {
        response = Redirect::to("/console/login").into_response();
    } else if response.status() == StatusCode::FORBIDDEN && is_problem(&response) {
        // The security layer's refusal (a role without access), as a console page.
        let body = axum::body::to_bytes(std::mem::take(response.body_mut()), 64 * 1024)
            .await
            .unwrap_or_default();
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|problem| problem["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "this page needs another role".to_owned());
        response = Failure::Forbidden(format!(
            "{detail}. Sign in with another key at /console/login."
        ))
        .into_response();
    }
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if existing.is_none()
        && let Ok(value) = HeaderValue::from_str(&format!(
            "{CSRF_COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict"
        ))
    {
        headers.append(header::SET_COOKIE, value);
    }
    response
}

fn is_problem(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/problem+json"))
}

/// Whether a POST comes from the console's own pages: a browser says so in `Sec-Fetch-Site`
/// (`same-origin`, or `none` for what the user typed); one that does not send it must send an
/// `Origin` naming this host, if any. A sibling subdomain (`same-site`) is refused: it could
/// have planted cookies for this one.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    match text("sec-fetch-site") {
        Some(site) => site == "same-origin" || site == "none",
        // Behind the gateway, the host the browser addressed is in `X-Forwarded-Host` (a
        // cross-site page cannot set it without a preflight the console never allows).
        None => match (text("origin"), text("x-forwarded-host").or(text("host"))) {
            (None, _) => true,
            (Some(origin), Some(host)) => origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority == host),
            (Some(_), None) => false,
        },
    }
}

/// An action's form carries the token its page was given, which must equal the one cookie of
/// that name (several mean another site set one), and come from the console's own pages.
fn check_csrf(headers: &HeaderMap, sent: &str) -> Result<(), Failure> {
    let tokens: Vec<&str> = cookies(headers, CSRF_COOKIE).collect();
    match tokens.as_slice() {
        [expected] if same_origin(headers) && !sent.is_empty() && *expected == sent => Ok(()),
        _ => Err(Failure::Forbidden(
            "the form's anti-forgery token does not match this browser's: reload the page and try again"
                .into(),
        )),
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    error: Option<String>,
}

async fn login_page() -> Result<Response, Failure> {
    page(StatusCode::OK, &LoginPage { error: None })
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
}

/// Checks the key or token as the API would and keeps it in the console's cookie.
async fn login(
    security: Option<Extension<std::sync::Arc<Security>>>,
    headers: HeaderMap,
    PageForm(form): PageForm<LoginForm>,
) -> Result<Response, Failure> {
    if !same_origin(&headers) {
        return Err(Failure::Forbidden(
            "sign in from the console's own page".into(),
        ));
    }
    let token = form.token.trim();
    let refused = |error: String| page(StatusCode::UNAUTHORIZED, &LoginPage { error: Some(error) });
    if token.is_empty()
        || !token
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, ';' | ',' | '"' | '\\'))
    {
        return refused("that is not an API key or token".into());
    }
    let mut response = Redirect::to("/console").into_response();
    // Without authentication every page is open: there is nothing to sign in to.
    let Some(Extension(security)) = security.filter(|security| security.enabled()) else {
        return Ok(response);
    };
    let session = match security.open_session(token) {
        Ok(session) => session,
        Err(error) => return refused(error.to_string()),
    };
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{CONSOLE_COOKIE}={session}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
        http_edge::security::CONSOLE_SESSION.as_secs()
    )) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    Ok(response)
}

async fn logout(
    security: Option<Extension<std::sync::Arc<Security>>>,
    headers: HeaderMap,
) -> Response {
    if !same_origin(&headers) {
        return Failure::Forbidden("sign out from the console's own page".into()).into_response();
    }
    if let (Some(Extension(security)), Some(session)) =
        (&security, Security::console_cookie(&headers))
    {
        security.close_session(session);
    }
    let mut response = Redirect::to("/console/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "platform_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

async fn htmx() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../static/htmx.min.js"),
    )
        .into_response()
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../static/console.css"),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Extractors whose rejections are console pages, not axum's plain text

/// A query string, or a page saying what is wrong with it.
struct PageQuery<T>(T);

impl<T, S> axum::extract::FromRequestParts<S> for PageQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Failure;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Failure> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| PageQuery(value))
            .map_err(|rejection| Failure::Rejected(rejection.status(), rejection.body_text()))
    }
}

/// A form body, or a page saying what is wrong with it.
struct PageForm<T>(T);

impl<T, S> axum::extract::FromRequest<S> for PageForm<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Failure;

    async fn from_request(request: Request, state: &S) -> Result<Self, Failure> {
        Form::<T>::from_request(request, state)
            .await
            .map(|Form(value)| PageForm(value))
            .map_err(|rejection| Failure::Rejected(rejection.status(), rejection.body_text()))
    }
}

// ---------------------------------------------------------------------------------------------
// Failures, as pages

/// Why a page could not be shown, shown as a page with the matching status.
#[derive(Debug)]
enum Failure {
    NotFound(String),
    BadRequest(String),
    Forbidden(String),
    /// The action does not fit the current state (an earlier event of the aggregate is still
    /// parked).
    Conflict(String),
    /// A request whose query string or form could not be read, with the status that says why
    /// (400, 415, 422).
    Rejected(StatusCode, String),
    /// A database or the log did not answer; the cause is logged, not shown.
    Unavailable(String),
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    heading: &'a str,
    lines: Vec<String>,
    back: &'a str,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, heading, line) = match self {
            Failure::NotFound(line) => (StatusCode::NOT_FOUND, "Not found", line),
            Failure::BadRequest(line) => (StatusCode::BAD_REQUEST, "Not understood", line),
            Failure::Forbidden(line) => (StatusCode::FORBIDDEN, "Refused", line),
            Failure::Conflict(line) => (StatusCode::CONFLICT, "Not now", line),
            Failure::Rejected(status, line) => (status, "Not understood", line),
            Failure::Unavailable(cause) => {
                tracing::warn!(%cause, "a console page could not be read");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Unavailable",
                    "the data behind this page did not answer; try again shortly".to_owned(),
                )
            }
        };
        let body = MessagePage {
            heading,
            lines: vec![line],
            back: "/console",
        }
        .render()
        .unwrap_or_else(|_| heading.to_owned());
        (status, Html(body)).into_response()
    }
}

fn unavailable(error: impl std::fmt::Display) -> Failure {
    Failure::Unavailable(error.to_string())
}

fn page(status: StatusCode, template: &impl Template) -> Result<Response, Failure> {
    let body = template.render().map_err(unavailable)?;
    Ok((status, Html(body)).into_response())
}

fn time(time: Option<DateTime<Utc>>) -> String {
    time.map(|time| time.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

fn saga_side(console: &Console) -> Result<&SagaSide, Failure> {
    console.saga.as_ref().ok_or_else(|| {
        Failure::NotFound("the saga orchestrator does not run in this process".into())
    })
}

fn read_side(console: &Console) -> Result<&ReadSide, Failure> {
    console
        .read
        .as_ref()
        .ok_or_else(|| Failure::NotFound("the projections do not run in this process".into()))
}

// ---------------------------------------------------------------------------------------------
// Overview

struct ProjectionRow {
    projection: String,
    lag_events: u64,
    lag_seconds: String,
    parked: u64,
}

#[derive(Template)]
#[template(path = "overview_fragment.html")]
struct OverviewFragment {
    now: String,
    sagas: Option<Vec<(String, i64)>>,
    attention: i64,
    stuck: i64,
    stuck_minutes: u64,
    projections: Option<Vec<ProjectionRow>>,
    problems: Vec<String>,
    charts: Vec<chart::Chart>,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    fragment: String,
}

/// The sampler's latest overview. A request marks the overview as looked at (so that the
/// sampler measures it every second) and wakes the sampler when the overview is stale; only a
/// first request, before any measurement, waits for one.
async fn overview_body(console: &Console) -> Result<String, Failure> {
    console.viewed_ms.store(
        Utc::now().timestamp_millis(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut latest = console.overview.subscribe();
    let current = latest.borrow().clone();
    if let Some((at, body)) = current {
        if at.elapsed() > MEASURE_VIEWED * 2 {
            console.wake.notify_one();
        }
        if at.elapsed() <= STALE {
            return Ok(body);
        }
    } else {
        console.wake.notify_one();
        let measured = tokio::time::timeout(FIRST_MEASUREMENT, async {
            latest
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|measured| measured.as_ref().map(|(_, body)| body.clone()))
        })
        .await;
        if let Ok(Some(body)) = measured {
            return Ok(body);
        }
    }
    // No sampler, or it has not measured for a while: one request measures, the others wait
    // and take its measurement.
    let _measuring = console.measuring.lock().await;
    if let Some((at, body)) = console.overview.borrow().as_ref()
        && at.elapsed() <= STALE
    {
        return Ok(body.clone());
    }
    let body = measure_overview(console).await?;
    console
        .overview
        .send_replace(Some((std::time::Instant::now(), body.clone())));
    Ok(body)
}

async fn measure_overview(console: &Console) -> Result<String, Failure> {
    let mut fragment = OverviewFragment {
        now: time(Some(Utc::now())),
        sagas: None,
        attention: 0,
        stuck: 0,
        stuck_minutes: STUCK_MINUTES,
        projections: None,
        problems: Vec::new(),
        charts: Vec::new(),
    };
    if let Some(side) = &console.saga {
        let states = driver::count_by_state(side.db())
            .await
            .map_err(unavailable)?;
        fragment.attention = states
            .iter()
            .find(|(state, _)| state == SagaState::NeedsAttention.as_str())
            .map_or(0, |(_, count)| *count);
        fragment.stuck = driver::count_stuck(side.db(), Duration::from_secs(STUCK_MINUTES * 60))
            .await
            .map_err(unavailable)?;
        fragment.sagas = Some(states);
    }
    let mut events = None;
    if let Some(read) = &console.read {
        let statuses = read.status().await.map_err(unavailable)?;
        events = statuses
            .iter()
            .find(|status| status.projection == "audit")
            .map(|audit| audit.partitions.iter().map(|lag| lag.end).sum());
        fragment.problems = statuses
            .iter()
            .flat_map(|status| status.problems.iter().cloned())
            .collect();
        fragment.projections = Some(
            statuses
                .into_iter()
                .map(|status| ProjectionRow {
                    projection: status.projection,
                    lag_events: status.lag_events,
                    lag_seconds: format!("{:.1}", status.lag_seconds),
                    parked: status.parked,
                })
                .collect(),
        );
    }
    // What this measurement saw is also a sample for the charts.
    console.record(Sample {
        at_ms: Utc::now().timestamp_millis(),
        events,
        sagas: fragment.sagas.clone(),
    });
    fragment.charts = console.charts();
    fragment.render().map_err(unavailable)
}

async fn overview(State(console): State<Console>) -> Result<Response, Failure> {
    let fragment = overview_body(&console).await?;
    page(StatusCode::OK, &OverviewPage { fragment })
}

async fn overview_fragment(State(console): State<Console>) -> Result<Response, Failure> {
    Ok(Html(overview_body(&console).await?).into_response())
}

// ---------------------------------------------------------------------------------------------
// Sagas

#[derive(Debug, Deserialize)]
struct SagaFilter {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    stuck_minutes: Option<String>,
    /// Changed at or after (a date and time in UTC).
    #[serde(default)]
    from: Option<String>,
    /// Changed before (a date and time in UTC).
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    /// Where the previous page ended.
    #[serde(default)]
    after: Option<String>,
}

#[derive(Template)]
#[template(path = "sagas.html")]
struct SagasPage {
    /// Each state, and whether the filter names it.
    states: Vec<(&'static str, bool)>,
    stuck_minutes: Option<u64>,
    from: String,
    to: String,
    limit: i64,
    sagas: Vec<SagaSummary>,
    /// The link to the next page, when there is one.
    next: Option<String>,
    /// Whether this is a later page (a link back to the first).
    paged: bool,
    /// The first page's link.
    first: String,
}

/// A whole number from a form field that may be left empty.
fn number(
    field: &str,
    raw: Option<&str>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, Failure> {
    match raw.map(str::trim).filter(|raw| !raw.is_empty()) {
        None => Ok(None),
        Some(raw) => raw
            .parse::<u64>()
            .ok()
            .filter(|value| range.contains(value))
            .map(Some)
            .ok_or_else(|| {
                Failure::BadRequest(format!(
                    "{field} must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                ))
            }),
    }
}

/// A date and time in UTC from a form field that may be left empty: what a `datetime-local`
/// input sends (`2026-12-07T21:30`, seconds optional), or RFC 3339.
fn moment(field: &str, raw: Option<&str>) -> Result<Option<DateTime<Utc>>, Failure> {
    let Some(raw) = raw.map(str::trim).filter(|raw| !raw.is_empty()) else {
        return Ok(None);
    };
    if let Ok(time) = DateTime::parse_from_rfc3339(raw) {
        return Ok(Some(time.with_timezone(&Utc)));
    }
    [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M:%S%.f",
    ]
    .iter()
    .find_map(|format| chrono::NaiveDateTime::parse_from_str(raw, format).ok())
    .map(|time| Some(time.and_utc()))
    .ok_or_else(|| {
        Failure::BadRequest(format!(
            "{field} must be a date and time such as 2026-12-07T21:30 (UTC)"
        ))
    })
}

/// A query string of `pairs`, the empty values left out.
fn query_string(pairs: &[(&str, String)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        if !value.is_empty() {
            query.append_pair(key, value);
        }
    }
    query.finish()
}

async fn sagas(
    State(console): State<Console>,
    PageQuery(filter): PageQuery<SagaFilter>,
) -> Result<Response, Failure> {
    let side = saga_side(&console)?;
    let states: Vec<&'static str> = SagaState::STARTED
        .iter()
        .map(|state| state.as_str())
        .collect();
    let state = filter
        .state
        .as_deref()
        .map(str::trim)
        .filter(|state| !state.is_empty());
    if let Some(state) = state
        && !states.contains(&state)
    {
        return Err(Failure::BadRequest(format!(
            "no saga state {state:?} (one of {})",
            states.join(", ")
        )));
    }
    let stuck_minutes = number(
        "stuck_minutes",
        filter.stuck_minutes.as_deref(),
        1..=525_600,
    )?;
    let from = moment("from", filter.from.as_deref())?;
    let to = moment("to", filter.to.as_deref())?;
    let limit = number("limit", filter.limit.as_deref(), 1..=1000)?.unwrap_or(100) as i64;
    let after = match filter.after.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => Some(raw.parse::<driver::Cursor>().map_err(Failure::BadRequest)?),
    };
    let paged = after.is_some();
    let (found, next) = driver::list_page(
        side.db(),
        &driver::ListFilter {
            state,
            stuck_for: stuck_minutes.map(|minutes| Duration::from_secs(minutes * 60)),
            updated_from: from.map(|time| time.timestamp_millis()),
            updated_to: to.map(|time| time.timestamp_millis()),
            after,
            limit,
        },
    )
    .await
    .map_err(unavailable)?;
    let field = |time: Option<DateTime<Utc>>| {
        time.map(|time| time.format("%Y-%m-%dT%H:%M:%S").to_string())
            .unwrap_or_default()
    };
    let (from, to) = (field(from), field(to));
    let filters = vec![
        ("state", state.unwrap_or_default().to_owned()),
        (
            "stuck_minutes",
            stuck_minutes.map(|m| m.to_string()).unwrap_or_default(),
        ),
        ("from", from.clone()),
        ("to", to.clone()),
        ("limit", limit.to_string()),
    ];
    let link = |after: Option<String>| {
        let mut pairs = filters.clone();
        pairs.push(("after", after.unwrap_or_default()));
        format!("/console/sagas?{}", query_string(&pairs))
    };
    page(
        StatusCode::OK,
        &SagasPage {
            states: states
                .iter()
                .map(|name| (*name, Some(*name) == state))
                .collect(),
            stuck_minutes,
            from,
            to,
            limit,
            sagas: found,
            next: next.map(|cursor| link(Some(cursor.to_string()))),
            paged,
            first: link(None),
        },
    )
}

struct StepRow {
    step: String,
    compensation: bool,
    attempt: u32,
    started: String,
    finished: String,
    deadline: String,
    outcome: String,
    answered_by: Option<String>,
}

#[derive(Template)]
#[template(path = "saga.html")]
struct SagaPage {
    order_id: String,
    state: String,
    revision: i64,
    reason: Option<String>,
    attention: Option<String>,
    started: String,
    updated: String,
    deadline: String,
    needs_attention: bool,
    csrf: String,
    steps: Vec<StepRow>,
    body: String,
    /// The order, its payment and its SKUs' stock as the read models hold them, when this
    /// process runs the projections.
    read_models: Option<ReadModels>,
}

struct ReadModels {
    order: Option<projections::query::OrderView>,
    payment: Option<projections::query::PaymentView>,
    stock: Vec<projections::query::StockView>,
}

/// The order, payment and stock read models for a saga's page.
async fn read_models(
    read: &ReadSide,
    order_id: &str,
    skus: &[String],
) -> Result<ReadModels, Failure> {
    let order = match read.db("orders") {
        Some(db) => projections::query::order(db, order_id)
            .await
            .map_err(unavailable)?,
        None => None,
    };
    let payment = match read.db("payments") {
        Some(db) => projections::query::payment(db, order_id)
            .await
            .map_err(unavailable)?,
        None => None,
    };
    let mut stock = Vec::new();
    if let Some(db) = read.db("inventory") {
        for sku in skus {
            if let Some(level) = projections::query::stock(db, sku)
                .await
                .map_err(unavailable)?
            {
                stock.push(level);
            }
        }
    }
    Ok(ReadModels {
        order,
        payment,
        stock,
    })
}

async fn saga(
    State(console): State<Console>,
    Path(order_id): Path<String>,
    Extension(Csrf(csrf)): Extension<Csrf>,
) -> Result<Response, Failure> {
    let side = saga_side(&console)?;
    let Some((saga, revision)) = driver::show(side.db(), &order_id)
        .await
        .map_err(unavailable)?
    else {
        return Err(Failure::NotFound(format!("no saga for order {order_id}")));
    };
    let steps = saga
        .history
        .iter()
        .map(|step| StepRow {
            step: step.step.to_string(),
            compensation: step.step.is_compensation(),
            attempt: step.attempt,
            started: time(Some(step.started_at)),
            finished: time(step.finished_at),
            deadline: time(step.deadline),
            outcome: step.outcome_text(),
            answered_by: match &step.outcome {
                Some(saga_orchestrator::StepOutcome::Answered { event_id, .. }) => {
                    Some(event_id.to_string())
                }
                _ => None,
            },
        })
        .collect();
    let body = serde_json::to_string_pretty(&saga).map_err(unavailable)?;
    let skus: Vec<String> = saga.lines.iter().map(|line| line.sku.to_string()).collect();
    let read_models = match &console.read {
        Some(read) => Some(read_models(read, &order_id, &skus).await?),
        None => None,
    };
    page(
        StatusCode::OK,
        &SagaPage {
            order_id: saga.order_id.to_string(),
            state: saga.state.to_string(),
            revision,
            reason: saga.reason.clone(),
            attention: saga.attention.as_ref().map(|attention| {
                format!(
                    "{} since {}: {}",
                    attention.step,
                    time(Some(attention.since)),
                    attention.reason
                )
            }),
            started: time(saga.started_at),
            updated: time(saga.updated_at),
            deadline: time(saga.deadline),
            needs_attention: saga.state == SagaState::NeedsAttention,
            csrf,
            steps,
            body,
            read_models,
        },
    )
}

#[derive(Debug, Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
}

/// The operator's retry of a parked step: as `POST /sagas/{order_id}/retry`, by this caller.
async fn retry_saga(
    State(console): State<Console>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    actor: Option<Extension<Actor>>,
    PageForm(form): PageForm<ActionForm>,
) -> Result<Response, Failure> {
    check_csrf(&headers, &form.csrf)?;
    let side = saga_side(&console)?;
    let actor = actor.map_or_else(|| "operator:console".to_owned(), |Extension(actor)| actor.0);
    match driver::retry(side.db(), side.config(), &order_id, &actor, side.wakes())
        .await
        .map_err(unavailable)?
    {
        driver::Retry::Retried(_) => {}
        driver::Retry::NoSaga => {
            return Err(Failure::NotFound(format!("no saga for order {order_id}")));
        }
        driver::Retry::NothingToRetry(state) => {
            return Err(Failure::Conflict(format!(
                "saga {order_id} is {state}, not needs_attention: nothing to retry"
            )));
        }
        driver::Retry::Changed => {
            return Err(Failure::Conflict(format!(
                "saga {order_id} changed meanwhile: look at it again"
            )));
        }
    }
    Ok(Redirect::to(&format!("/console/sagas/{order_id}")).into_response())
}

// ---------------------------------------------------------------------------------------------
// Projections and parked events

struct ProjectionSection {
    name: String,
    lag_events: u64,
    lag_seconds: String,
    problems: Vec<String>,
    partitions: Vec<PartitionLagRow>,
    parked: Vec<ParkedEvent>,
    /// Parked events beyond those listed.
    more_parked: usize,
}

struct PartitionLagRow {
    topic: String,
    partition: u32,
    applied: u64,
    end: u64,
    lag_events: u64,
    lag_seconds: String,
}

impl From<PartitionLag> for PartitionLagRow {
    fn from(lag: PartitionLag) -> Self {
        PartitionLagRow {
            topic: lag.topic,
            partition: lag.partition,
            applied: lag.applied,
            end: lag.end,
            lag_events: lag.lag_events,
            lag_seconds: format!("{:.1}", lag.lag_seconds),
        }
    }
}

#[derive(Template)]
#[template(path = "projections.html")]
struct ProjectionsPage {
    projections: Vec<ProjectionSection>,
    csrf: String,
}

async fn projections_page(
    State(console): State<Console>,
    Extension(Csrf(csrf)): Extension<Csrf>,
) -> Result<Response, Failure> {
    let read = read_side(&console)?;
    let mut sections = Vec::new();
    for status in read.status().await.map_err(unavailable)? {
        let mut parked = match read.db(&status.projection) {
            Some(db) => parked::list(db, &status.projection, false)
                .await
                .map_err(unavailable)?,
            None => Vec::new(),
        };
        let more_parked = parked.len().saturating_sub(PARKED_SHOWN);
        parked.truncate(PARKED_SHOWN);
        sections.push(ProjectionSection {
            name: status.projection,
            lag_events: status.lag_events,
            lag_seconds: format!("{:.1}", status.lag_seconds),
            problems: status.problems,
            partitions: status.partitions.into_iter().map(Into::into).collect(),
            parked,
            more_parked,
        });
    }
    page(
        StatusCode::OK,
        &ProjectionsPage {
            projections: sections,
            csrf,
        },
    )
}

#[derive(Debug, Deserialize)]
struct ParkedForm {
    #[serde(default)]
    csrf: String,
    projection: String,
    position: String,
    action: String,
}

/// Retry or skip a parked event: the operations of `platform parked retry|skip`.
async fn resolve_parked(
    State(console): State<Console>,
    headers: HeaderMap,
    PageForm(form): PageForm<ParkedForm>,
) -> Result<Response, Failure> {
    check_csrf(&headers, &form.csrf)?;
    let read = read_side(&console)?;
    let resolution = match form.action.as_str() {
        "retry" => Resolution::Retry,
        "skip" => Resolution::Skip,
        other => {
            return Err(Failure::BadRequest(format!(
                "no action {other:?} (retry or skip)"
            )));
        }
    };
    let position: event_log::Position = form
        .position
        .parse()
        .map_err(|error: String| Failure::BadRequest(error))?;
    let (Some(db), Some(model)) = (read.db(&form.projection), read.projection(&form.projection))
    else {
        return Err(Failure::NotFound(format!(
            "no projection {:?}",
            form.projection
        )));
    };
    let resolved = parked::resolve(db, model.as_ref(), &position, resolution)
        .await
        .map_err(|error| match error {
            parked::ResolveError::Db(error) => unavailable(error),
            missing @ parked::ResolveError::NotFound { .. } => {
                Failure::NotFound(missing.to_string())
            }
            other => Failure::Conflict(other.to_string()),
        })?;
    let mut lines = Vec::new();
    if let Some(offset) = resolved.skipped {
        lines.push(format!("Skipped the event at offset {offset}."));
    }
    for offset in &resolved.applied {
        lines.push(format!("Applied the event at offset {offset}."));
    }
    if let Some((offset, error)) = &resolved.still_parked {
        lines.push(format!(
            "The event at offset {offset} is still parked: {error}"
        ));
    }
    page(
        StatusCode::OK,
        &MessagePage {
            heading: "Parked event",
            lines,
            back: "/console/projections",
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Audit

#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    q: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    query: String,
    timelines: Vec<Timeline>,
    trace: Option<Trace>,
}

/// Whatever the id names: an order's and its payment's timelines, a stock item's, or a
/// correlation's flow.
async fn audit_search(
    State(console): State<Console>,
    PageQuery(query): PageQuery<AuditQuery>,
) -> Result<Response, Failure> {
    let read = read_side(&console)?;
    let db = read
        .db("audit")
        .ok_or_else(|| Failure::NotFound("no audit read model in this process".into()))?;
    let id = query.q.trim().to_owned();
    let mut timelines = Vec::new();
    let mut trace = None;
    if !id.is_empty() {
        for aggregate_type in audit::AGGREGATE_TYPES {
            match audit::timeline(db, aggregate_type, &id).await {
                Ok(timeline) if !timeline.events.is_empty() => timelines.push(timeline),
                Ok(_) | Err(AuditError::NotFound(_) | AuditError::UnknownType(_)) => {}
                Err(error) => return Err(unavailable(error)),
            }
        }
        match audit::trace(db, &id).await {
            Ok(found) if !found.steps.is_empty() => trace = Some(found),
            Ok(_) | Err(AuditError::NotFound(_)) => {}
            Err(error) => return Err(unavailable(error)),
        }
    }
    page(
        StatusCode::OK,
        &AuditPage {
            query: id,
            timelines,
            trace,
        },
    )
}

#[derive(Debug, Deserialize)]
struct VersionQuery {
    #[serde(default)]
    version: Option<String>,
    /// A date and time in UTC, when no version is given.
    #[serde(default)]
    at: Option<String>,
}

#[derive(Template)]
#[template(path = "aggregate.html")]
struct AggregatePage {
    timeline: Timeline,
    state_version: i64,
    state_at: Option<String>,
    state: String,
}

async fn aggregate(
    State(console): State<Console>,
    Path((aggregate_type, id)): Path<(String, String)>,
    PageQuery(query): PageQuery<VersionQuery>,
) -> Result<Response, Failure> {
    let read = read_side(&console)?;
    let db = read
        .db("audit")
        .ok_or_else(|| Failure::NotFound("no audit read model in this process".into()))?;
    let as_of = match (
        number("version", query.version.as_deref(), 1..=i64::MAX as u64)?,
        moment("at", query.at.as_deref())?,
    ) {
        (Some(version), _) => AsOf::Version(version),
        (None, Some(time)) => AsOf::Time(time),
        (None, None) => AsOf::Latest,
    };
    let known = |error: AuditError| match error {
        AuditError::NotFound(message) => Failure::NotFound(message),
        AuditError::UnknownType(message) => Failure::NotFound(message),
        other => unavailable(other),
    };
    let timeline = audit::timeline(db, &aggregate_type, &id)
        .await
        .map_err(known)?;
    let state = audit::state_as_of(db, &aggregate_type, &id, as_of)
        .await
        .map_err(known)?;
    page(
        StatusCode::OK,
        &AggregatePage {
            timeline,
            state_version: state.version,
            state_at: state.occurred_at,
            state: serde_json::to_string_pretty(&state.state).map_err(unavailable)?,
        },
    )
}
