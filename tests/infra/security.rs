//! The security layer on a running platform: every role against every route class, bad and
//! missing credentials, JWTs, rate limits, request limits, and secrets kept out of output.

use std::time::Duration;

use platform::Part;
use platform::settings::{Secret, Toggle};
use serde_json::json;

use crate::support::{self, read};

const CLIENT: &str = "client-key-0123456789abcdef";
const OPERATOR: &str = "operator-key-0123456789abcdef";
const AUDITOR: &str = "auditor-key-0123456789abcdef";
const JWT_SECRET: &str = "jwt-secret-0123456789abcdef0123456789";

fn jwt(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode a token")
}

fn in_an_hour() -> i64 {
    chrono::Utc::now().timestamp() + 3600
}

/// A request to a route of each class (as the route's service declares it).
fn requests() -> Vec<(
    &'static str,
    reqwest::Method,
    &'static str,
    Option<serde_json::Value>,
)> {
    use reqwest::Method;
    vec![
        ("open", Method::GET, "/health/live", None),
        ("open", Method::GET, "/metrics", None),
        (
            "command",
            Method::POST,
            "/inventory/SKU-AUTH/receipts",
            Some(json!({"quantity": 1})),
        ),
        ("read", Method::GET, "/inventory/SKU-AUTH", None),
        ("read", Method::GET, "/sagas", None),
        (
            "operator",
            Method::POST,
            "/sagas/0192f5a4-1111-7000-8000-000000000001/retry",
            None,
        ),
        (
            "audit",
            Method::GET,
            "/audit/orders/0192f5a4-1111-7000-8000-000000000001",
            None,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_route_class() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = support::settings(dir.path());
    settings.security.auth = Some(Toggle::On);
    settings.security.api_keys = Some(Secret::from(format!(
        "client:{CLIENT},operator:{OPERATOR},auditor:{AUDITOR}"
    )));
    settings.security.jwt_secret = Some(Secret::from(JWT_SECRET));
    let app = support::platform(settings, Part::All).await;
    let client = reqwest::Client::new();

    let operator_token = jwt(
        json!({"sub": "ops-1", "role": "operator", "exp": in_an_hour()}),
        JWT_SECRET,
    );
    let client_token = jwt(
        json!({"sub": "c-1", "roles": ["client"], "exp": in_an_hour()}),
        JWT_SECRET,
    );
    let expired = jwt(
        json!({"sub": "c-1", "role": "client", "exp": 1_000}),
        JWT_SECRET,
    );
    let forged = jwt(
        json!({"sub": "c-1", "role": "client", "exp": in_an_hour()}),
        "another-secret-0123456789abcdef0123",
    );
    let roleless = jwt(json!({"sub": "c-1", "exp": in_an_hour()}), JWT_SECRET);

    // Who, how they authenticate, and the statuses expected for the classes open, command,
    // read, operator, audit: "ok" means neither 401 nor 403 (the route answers for itself).
    type Caller<'a> = (&'a str, Option<(&'a str, String)>, [&'a str; 5]);
    let callers: Vec<Caller> = vec![
        ("anonymous", None, ["ok", "401", "401", "401", "401"]),
        (
            "unknown key",
            Some(("authorization", "Bearer not-a-key-0123456789".into())),
            ["ok", "401", "401", "401", "401"],
        ),
        (
            "client key",
            Some(("authorization", format!("Bearer {CLIENT}"))),
            ["ok", "ok", "ok", "403", "403"],
        ),
        (
            "client key as X-Api-Key",
            Some(("x-api-key", CLIENT.into())),
            ["ok", "ok", "ok", "403", "403"],
        ),
        (
            "operator key",
            Some(("authorization", format!("Bearer {OPERATOR}"))),
            ["ok", "403", "ok", "ok", "403"],
        ),
        (
            "auditor key",
            Some(("authorization", format!("Bearer {AUDITOR}"))),
            ["ok", "403", "ok", "403", "ok"],
        ),
        (
            "client JWT",
            Some(("authorization", format!("Bearer {client_token}"))),
            ["ok", "ok", "ok", "403", "403"],
        ),
        (
            "operator JWT",
            Some(("authorization", format!("Bearer {operator_token}"))),
            ["ok", "403", "ok", "ok", "403"],
        ),
        (
            "expired JWT",
            Some(("authorization", format!("Bearer {expired}"))),
            ["ok", "401", "401", "401", "401"],
        ),
        (
            "forged JWT",
            Some(("authorization", format!("Bearer {forged}"))),
            ["ok", "401", "401", "401", "401"],
        ),
        (
            "JWT without a role",
            Some(("authorization", format!("Bearer {roleless}"))),
            ["ok", "403", "403", "403", "403"],
        ),
        (
            "basic auth",
            Some(("authorization", "Basic dXNlcjpwYXNz".into())),
            ["ok", "401", "401", "401", "401"],
        ),
    ];
    let classes = ["open", "command", "read", "operator", "audit"];
    let mut failures = Vec::new();
    for (who, credential, expected) in &callers {
        for (class, method, path, body) in requests() {
            let index = classes.iter().position(|c| *c == class).expect("class");
            let mut request = client.request(method.clone(), format!("{}{path}", app.url()));
            if let Some((name, value)) = credential {
                request = request.header(*name, value);
            }
            if let Some(body) = &body {
                request = request.json(body);
            }
            let (status, headers, problem) = read(request.send().await.expect("request")).await;
            let got = match status {
                401 | 403 => status.to_string(),
                _ => "ok".to_owned(),
            };
            if got != expected[index] {
                failures.push(format!(
                    "{who} {method} {path}: expected {}, got {status} {problem}",
                    expected[index]
                ));
                continue;
            }
            if status == 401 || status == 403 {
                assert_eq!(
                    headers.get("content-type").and_then(|v| v.to_str().ok()),
                    Some("application/problem+json"),
                    "{who} {path}"
                );
                assert_eq!(problem["status"], status, "{who} {path}: {problem}");
                let text = problem.to_string();
                for secret in [CLIENT, OPERATOR, AUDITOR, JWT_SECRET] {
                    assert!(
                        !text.contains(secret),
                        "a problem never quotes a secret: {text}"
                    );
                }
            }
            if status == 401 {
                assert_eq!(
                    headers
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok()),
                    Some("Bearer"),
                    "{who} {path}"
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "auth matrix mismatches:\n{}",
        failures.join("\n")
    );
    app.stop().await;
}

/// The authenticated caller is the actor of its commands' events, the saga acts on its behalf,
/// and an idempotency key is the caller's own: another caller's request with the same key is
/// another command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_is_the_actor_and_owns_its_idempotency_keys() {
    const OTHER_CLIENT: &str = "other-client-key-0123456789abcdef";
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = support::settings(dir.path());
    settings.security.auth = Some(Toggle::On);
    settings.security.api_keys = Some(Secret::from(format!(
        "client:{CLIENT},client:{OTHER_CLIENT},auditor:{AUDITOR}"
    )));
    let app = support::platform(settings, Part::All).await;
    let client = reqwest::Client::new();
    let send = |key: &'static str, path: &str, idempotency: Option<&str>, body| {
        let mut request = client
            .post(format!("{}{path}", app.url()))
            .bearer_auth(key)
            .json(&body);
        if let Some(idempotency) = idempotency {
            request = request.header("idempotency-key", idempotency);
        }
        request.send()
    };
    let (status, _, received) = read(
        send(
            CLIENT,
            "/inventory/SKU-ACTOR/receipts",
            None,
            json!({"quantity": 10}),
        )
        .await
        .expect("receipt"),
    )
    .await;
    assert_eq!(status, 200, "{received}");
    let order = json!({"customer_id": "c-1", "currency": "EUR", "payment_token": "tok_approve",
        "lines": [{"sku": "SKU-ACTOR", "quantity": 1, "unit_price_minor": 500}]});
    let mut placed = Vec::new();
    for key in [CLIENT, CLIENT, OTHER_CLIENT] {
        let (status, _, body) = read(
            send(key, "/orders", Some("order-1"), order.clone())
                .await
                .expect("place"),
        )
        .await;
        assert!(status == 201 || status == 200, "{status} {body}");
        placed.push(body["order_id"].as_str().expect("order id").to_owned());
    }
    assert_eq!(
        placed[0], placed[1],
        "the same caller's retry is the same order"
    );
    assert_ne!(
        placed[0], placed[2],
        "another caller's key names another order"
    );

    // The timeline's (event type, actor) pairs once it holds `count` events of type `until`.
    let audit = |path: String, until: &'static str, count: usize| {
        let client = client.clone();
        let url = format!("{}{path}", app.url());
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let (status, _, body) = read(
                    client
                        .get(&url)
                        .bearer_auth(AUDITOR)
                        .send()
                        .await
                        .expect("audit"),
                )
                .await;
                let actors: Vec<(String, String)> = body["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|event| {
                        (
                            event["event_type"].as_str().unwrap_or("").to_owned(),
                            event["actor"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect();
                let seen = actors.iter().filter(|(kind, _)| kind == until).count();
                if status == 200 && seen >= count {
                    return actors;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{path}: no {count} × {until} after 30 s: {status} {body}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let caller_of = |actors: &[(String, String)], kind: &str| {
        actors
            .iter()
            .find(|(event, _)| event == kind)
            .map(|(_, actor)| actor.clone())
            .unwrap_or_else(|| panic!("no {kind} in {actors:?}"))
    };
    let order_events = audit(format!("/audit/order/{}", placed[0]), "order.confirmed", 1).await;
    let caller = caller_of(&order_events, "order.placed");
    assert!(caller.starts_with("key:"), "{order_events:?}");
    assert_eq!(
        caller_of(&order_events, "order.confirmed"),
        format!("saga on behalf of {caller}"),
        "{order_events:?}"
    );
    let other = audit(format!("/audit/order/{}", placed[2]), "order.placed", 1).await;
    let other_caller = caller_of(&other, "order.placed");
    assert!(
        other_caller.starts_with("key:") && other_caller != caller,
        "{other:?}"
    );
    let stock = audit("/audit/stock/SKU-ACTOR".to_owned(), "stock.reserved", 2).await;
    assert_eq!(caller_of(&stock, "stock.received"), caller, "{stock:?}");
    assert!(
        stock
            .iter()
            .filter(|(event, _)| event == "stock.reserved")
            .all(|(_, actor)| actor.starts_with("saga on behalf of key:")),
        "{stock:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_has_its_own_rate_limit_and_429_says_when_to_retry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = support::settings(dir.path());
    settings.security.auth = Some(Toggle::On);
    settings.security.api_keys = Some(Secret::from(format!("client:{CLIENT},operator:{OPERATOR}")));
    settings.security.rate_limit = 2.0;
    settings.security.rate_burst = 3;
    let app = support::platform(settings, Part::All).await;
    let client = reqwest::Client::new();
    let get = |key: &'static str| {
        client
            .get(format!("{}/inventory/SKU-RATE", app.url()))
            .bearer_auth(key)
            .send()
    };
    for attempt in 0..3 {
        let status = get(CLIENT).await.expect("request").status().as_u16();
        assert_ne!(status, 429, "attempt {attempt} is within the burst");
    }
    let (status, headers, problem) = read(get(CLIENT).await.expect("request")).await;
    assert_eq!(status, 429, "{problem}");
    assert_eq!(problem["type"], "/problems/rate-limited");
    let retry_after: u64 = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    // Another key is not affected, and open routes are never limited.
    assert_ne!(get(OPERATOR).await.expect("request").status().as_u16(), 429);
    for _ in 0..10 {
        let health = client
            .get(format!("{}/health/live", app.url()))
            .send()
            .await
            .expect("health");
        assert_eq!(health.status().as_u16(), 200);
    }
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_ne!(
        get(CLIENT).await.expect("request").status().as_u16(),
        429,
        "refilled"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_dev_server_is_open_and_limits_still_apply() {
    let dir = tempfile::tempdir().expect("temp dir");
    let defaults = platform::settings::SecuritySettings::default();
    assert!(!defaults.auth_enabled(false), "off on the embedded backend");
    assert!(defaults.auth_enabled(true), "on with Kafka or Postgres");
    let mut settings = support::settings(dir.path());
    settings.security.auth = None;
    let app = support::platform(settings, Part::All).await;
    let client = reqwest::Client::new();
    let (status, _, body) = read(
        client
            .post(format!("{}/inventory/SKU-OPEN/receipts", app.url()))
            .json(&json!({"quantity": 2}))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let long = format!("{}/inventory/{}", app.url(), "A".repeat(5000));
    let (status, _, problem) = read(client.get(long).send().await.expect("request")).await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (414, Some("/problems/uri-too-long"))
    );

    let mut request = client.get(format!("{}/inventory/SKU-OPEN", app.url()));
    for index in 0..40 {
        request = request.header(format!("x-filler-{index}"), "x".repeat(500));
    }
    let (status, _, problem) = read(request.send().await.expect("request")).await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (431, Some("/problems/headers-too-large"))
    );
    app.stop().await;
}

/// How long until the server closes `stream` (a read returns end-of-file or an error), while
/// `trickle` sends one more header byte every 100 ms (a slowloris) when set.
async fn closed_after(stream: &mut tokio::net::TcpStream, trickle: bool) -> Duration {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let started = std::time::Instant::now();
    let mut buffer = [0u8; 1024];
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server kept the connection for 20 s"
        );
        if trickle {
            // A write to a connection the server closed may fail; the read says so next.
            let _ = stream.write_all(b"x").await;
        }
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
    }
}

/// A connection that sends nothing, or its headers a byte at a time, is closed within the
/// header timeout; a body that never finishes gets 503 at the request timeout; connections
/// beyond the cap wait until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_hold_no_connection_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = support::settings(dir.path());
    settings.http.http_header_timeout_ms = 1_000;
    settings.http.http_request_timeout_ms = 1_500;
    settings.http.http_max_connections = 3;
    let app = support::platform(settings, Part::All).await;

    let mut idle = TcpStream::connect(app.address).await.expect("connect");
    let waited = closed_after(&mut idle, false).await;
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(4)).contains(&waited),
        "a connection that sent nothing was closed after {waited:?} (header timeout 1 s)"
    );
    let mut slowloris = TcpStream::connect(app.address).await.expect("connect");
    slowloris
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let waited = closed_after(&mut slowloris, true).await;
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(4)).contains(&waited),
        "a slowloris was closed after {waited:?} (header timeout 1 s)"
    );

    // Headers complete, body never: the request timeout answers.
    let mut slow_body = TcpStream::connect(app.address).await.expect("connect");
    slow_body
        .write_all(
            b"POST /inventory/SKU-SLOW/receipts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"quan",
        )
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(10), slow_body.read(&mut buffer))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert_ne!(read, 0, "closed without an answer");
        answer.extend_from_slice(&buffer[..read]);
    }
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(1_400),
        "answered after {:?}",
        started.elapsed()
    );

    // The cap: three connections held open (each within its header timeout, by a fresh
    // request started on it), a fourth request waits until one of them closes.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(app.address).await.expect("connect");
        stream
            .write_all(b"GET /health/live HTTP/1.1\r\n")
            .await
            .expect("write");
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let answer = client
        .get(format!("{}/health/live", app.url()))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("served once a held connection closes");
    assert_eq!(answer.status().as_u16(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "a fourth connection was served after {waited:?}, beside three held ones (cap 3)"
    );
    drop(held);
    app.stop().await;
}

#[test]
fn secrets_never_show_in_debug_output() {
    let mut settings = platform::Settings::embedded("/tmp/unused");
    settings.security.api_keys = Some(Secret::from(format!("client:{CLIENT}")));
    settings.security.jwt_secret = Some(Secret::from(JWT_SECRET));
    let shown = format!("{settings:?}");
    assert!(
        !shown.contains(CLIENT) && !shown.contains(JWT_SECRET),
        "{shown}"
    );
    let security =
        http_edge::security::Security::from_settings(&settings.security, true).expect("security");
    let shown = format!("{security:?}");
    assert!(
        !shown.contains(CLIENT) && !shown.contains(JWT_SECRET),
        "{shown}"
    );
}

/// The console with authentication on: a browser signs in with a key; operators get every
/// page, auditors the audit pages, clients none; the console's cookie opens no API route; an
/// action from another site, or without the page's token, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_the_roles_and_its_cookie_opens_only_the_console() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = support::settings(dir.path());
    settings.security.auth = Some(Toggle::On);
    settings.security.api_keys = Some(Secret::from(format!(
        "client:{CLIENT},operator:{OPERATOR},auditor:{AUDITOR}"
    )));
    let app = support::platform(settings, Part::All).await;
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let url = app.url();

    // Not signed in: the pages send the browser to the sign-in page.
    let page = browser
        .get(format!("{url}/console"))
        .send()
        .await
        .expect("GET");
    assert_eq!(page.status(), 303, "a browser not signed in is redirected");
    assert_eq!(page.headers()["location"], "/console/login");

    let sign_in = |key: &'static str| {
        let browser = browser.clone();
        let url = url.clone();
        async move {
            let answer = browser
                .post(format!("{url}/console/login"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("sec-fetch-site", "same-origin")
                .body(format!("token={key}"))
                .send()
                .await
                .expect("POST");
            let status = answer.status().as_u16();
            let cookie = answer
                .headers()
                .get_all("set-cookie")
                .iter()
                .map(|value| value.to_str().expect("cookie").to_owned())
                .find(|value| value.starts_with("platform_console="));
            (status, cookie)
        }
    };
    let (status, _) = sign_in("not-a-key-0123456789").await;
    assert_eq!(status, 401, "an unknown key does not sign in");

    let session = |cookie: Option<String>| {
        let cookie = cookie.expect("a sign-in cookie");
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        for key in [CLIENT, OPERATOR, AUDITOR] {
            assert!(
                !cookie.contains(key),
                "the cookie holds a session id, not the key"
            );
        }
        cookie.split(';').next().expect("pair").to_owned()
    };
    let get = |path: &str, cookie: &str| {
        browser
            .get(format!("{url}{path}"))
            .header("cookie", cookie.to_owned())
            .send()
    };
    let (status, operator) = sign_in(OPERATOR).await;
    assert_eq!(status, 303);
    let operator = session(operator);
    let (_, auditor) = sign_in(AUDITOR).await;
    let auditor = session(auditor);
    let (_, client) = sign_in(CLIENT).await;
    let client = session(client);

    for (who, cookie, console, audit) in [
        ("operator", &operator, 200, 200),
        ("auditor", &auditor, 403, 200),
        ("client", &client, 403, 403),
    ] {
        for path in ["/console", "/console/sagas", "/console/projections"] {
            let status = get(path, cookie).await.expect("GET").status();
            assert_eq!(status, console, "{who} on {path}");
        }
        let status = get("/console/audit?q=x", cookie)
            .await
            .expect("GET")
            .status();
        assert_eq!(status, audit, "{who} on the audit pages");
    }

    // The console's cookie is no credential for the API, not even the operator's.
    let api = browser
        .post(format!("{url}/sagas/some-order/retry"))
        .header("cookie", operator.clone())
        .send()
        .await
        .expect("POST");
    assert_eq!(api.status(), 401, "the cookie opens no API route");
    let read = get("/sagas", &operator).await.expect("GET");
    assert_eq!(read.status(), 401, "nor a read route");

    // An action needs this browser's page token and must come from the console's own pages.
    let page = get("/console/projections", &operator).await.expect("GET");
    let csrf = support::set_cookie(page.headers(), "console_csrf").expect("a page token");
    let cookies = format!("{operator}; console_csrf={csrf}");
    let action = |site: &'static str, cookies: String, token: String| {
        browser
            .post(format!("{url}/console/parked"))
            .header("cookie", cookies)
            .header("sec-fetch-site", site)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "csrf={token}&projection=orders&position=t%3A0%3A0&action=skip"
            ))
            .send()
    };
    let status = |answer: reqwest::Response| answer.status().as_u16();
    assert_eq!(
        status(
            action("cross-site", cookies.clone(), csrf.clone())
                .await
                .expect("POST")
        ),
        403,
        "another site"
    );
    assert_eq!(
        status(
            action("same-site", cookies.clone(), csrf.clone())
                .await
                .expect("POST")
        ),
        403,
        "a sibling subdomain"
    );
    assert_eq!(
        status(
            action("same-origin", cookies.clone(), "0".repeat(32))
                .await
                .expect("POST")
        ),
        403,
        "another token"
    );
    let planted = format!("{cookies}; console_csrf={}", "0".repeat(32));
    assert_eq!(
        status(
            action("same-origin", planted, csrf.clone())
                .await
                .expect("POST")
        ),
        403,
        "a second token cookie"
    );
    // With the token, from the page: the action runs (no such parked event: 404).
    assert_eq!(
        status(action("same-origin", cookies, csrf).await.expect("POST")),
        404,
        "the operator's own action"
    );

    // Signed out, the session opens nothing any more.
    let out = browser
        .post(format!("{url}/console/logout"))
        .header("cookie", operator.clone())
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .expect("POST");
    assert_eq!(out.status(), 303);
    let after = get("/console", &operator).await.expect("GET");
    assert_eq!(
        after.status(),
        303,
        "a signed-out session is sent to sign in"
    );
    app.stop().await;
}
