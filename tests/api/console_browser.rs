//! The console in a real browser: headless Chromium (Debian's `chromium`, driven through its
//! `chromedriver` by fantoccini) against a platform with authentication on. Orders take every
//! saga path; the operator signs in with the keyboard, watches the overview refresh itself,
//! pages through the sagas, retries a parked saga and sees it finish, follows a request's flow,
//! retries and skips a parked event; the auditor and the client see what their roles allow; the
//! pages fit a 390-pixel-wide screen.
//!
//! `scripts/chromium.sh install` installs the browser; under `scripts/test.sh`
//! (`TEST_REQUIRE_BACKENDS=1`) a missing browser fails the test instead of skipping it.
//! `CONSOLE_SCREENSHOTS=<dir>` saves the main pages there as PNG (the README's pictures).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use domain::order::{OrderConfirmed, OrderEvent};
use event_log::partition_for;
use fantoccini::{Client, ClientBuilder, Locator};
use platform::settings::{Secret, Toggle};
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, settings};

const CLIENT: &str = "client-key-0123456789abcdef";
const OPERATOR: &str = "operator-key-0123456789abcdef";
const AUDITOR: &str = "auditor-key-0123456789abcdef";

/// WebDriver's code for the Enter key.
const ENTER: &str = "\u{E007}";

/// How long a page may take to show what a test waits for (the read models catch up).
const PATIENCE: Duration = Duration::from_secs(30);

/// Chromium driven by a chromedriver this test started; both end with it.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    /// Ends chromedriver and the browser it started, also when the test failed midway (the
    /// session was never closed): both are in chromedriver's process group.
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn binary(variable: &str, default: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| default.to_owned())
}

impl Browser {
    /// A fresh headless Chromium, or `None` when it is not installed and not required.
    async fn start() -> Option<Browser> {
        let chromium = binary("CHROMIUM", "/usr/bin/chromium");
        let chromedriver = binary("CHROMEDRIVER", "/usr/bin/chromedriver");
        if !std::path::Path::new(&chromium).exists()
            || !std::path::Path::new(&chromedriver).exists()
        {
            assert!(
                std::env::var("TEST_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "TEST_REQUIRE_BACKENDS=1 but {chromium} or {chromedriver} is missing: run scripts/chromium.sh install"
            );
            eprintln!("skipped: no {chromium} / {chromedriver} (scripts/chromium.sh install)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().expect("a profile directory");
        // The flags the machine's closed network needs: no background fetches, no sync, no QUIC.
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let mut driver = Some(driver);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let client = loop {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => break client,
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%error, "chromedriver not answering yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => {
                    if let Some(mut driver) = driver.take() {
                        let _ = driver.kill();
                    }
                    panic!("no WebDriver session with {chromium}: {error}");
                }
            }
        };
        Some(Browser {
            client,
            driver: driver.take().expect("the driver"),
            _profile: profile,
        })
    }

    async fn open(&self, url: &str) {
        self.client.goto(url).await.expect("open the page");
    }

    async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("url")
            .path()
            .to_owned()
    }

    /// The text of the page's main part.
    async fn text(&self) -> String {
        match self.client.find(Locator::Css("main")).await {
            Ok(main) => main.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("no {css} on the page: {error}"))
            .click()
            .await
            .unwrap_or_else(|error| panic!("clicking {css}: {error}"));
    }

    /// Waits until the page shows all of `texts`, reloading it between looks when `reload`
    /// (else the page must change by itself).
    async fn until_shows(&self, texts: &[&str], reload: bool) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let text = self.text().await;
            if texts.iter().all(|wanted| text.contains(wanted)) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never showed {texts:?}; it shows:\n{text}",
                self.path().await
            );
            if reload {
                self.client.refresh().await.expect("reload");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Accepts the confirmation the page asks for before an action.
    async fn confirm(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while let Err(error) = self.client.accept_alert().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no confirmation was asked: {error}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Signs in on the sign-in page with the keyboard alone: the key typed, then Enter.
    async fn sign_in(&self, base: &str, key: &str) {
        self.client.delete_all_cookies().await.expect("cookies");
        self.open(&format!("{base}/console/login")).await;
        let field = self
            .client
            .find(Locator::Css("input[name=token]"))
            .await
            .expect("the key field");
        field
            .send_keys(&format!("{key}{ENTER}"))
            .await
            .expect("type the key");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.path().await == "/console/login" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the sign-in did not leave the page"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the page fits the window's width (wide tables scroll inside themselves).
    async fn fits_width(&self) -> bool {
        let fits = self
            .client
            .execute(
                "return document.documentElement.scrollWidth <= document.documentElement.clientWidth;",
                vec![],
            )
            .await
            .expect("measure the page");
        fits == Value::Bool(true)
    }

    async fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("CONSOLE_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        std::fs::write(format!("{dir}/{name}.png"), png).expect("save the screenshot");
    }
}

/// A request with `key`, its JSON answer.
async fn call(app: &TestApp, key: &str, path: &str, body: Value) -> (u16, Value) {
    let response = app
        .client
        .post(app.url(path))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn place(app: &TestApp, token: &str, sku: &str, quantity: i64) -> String {
    let (status, body) = call(
        app,
        CLIENT,
        "/orders",
        json!({"customer_id": "c-1", "currency": "EUR", "payment_token": token,
               "lines": [{"sku": sku, "quantity": quantity, "unit_price_minor": 500}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["order_id"].as_str().expect("an order id").to_owned()
}

/// The saga's state, as the operator's API shows it.
async fn saga_state(app: &TestApp, order_id: &str) -> String {
    let response = app
        .client
        .get(app.url(&format!("/sagas/{order_id}")))
        .header("x-api-key", OPERATOR)
        .send()
        .await
        .expect("send");
    let body: Value = response.json().await.unwrap_or(Value::Null);
    body["saga"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn until_saga(app: &TestApp, order_id: &str, states: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let state = saga_state(app, order_id).await;
        if states.contains(&state.as_str()) {
            return state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga {order_id} is {state:?}, never one of {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_works_through_the_console_in_a_real_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let mut settings = settings(Backend::Embedded, dir.path());
    settings.security.auth = Some(Toggle::On);
    settings.security.api_keys = Some(Secret::from(format!(
        "client:{CLIENT},operator:{OPERATOR},auditor:{AUDITOR}"
    )));
    // A payment that never answers is given up after 2 s; a refund's resends park after ~2 s.
    settings.saga.timeout_ms = 2_000;
    settings.saga.compensation_timeout_ms = 300;
    let app = TestApp::spawn_with(Backend::Embedded, settings, dir).await;
    let base = app.address.clone();

    // Not signed in: the console sends the browser to its sign-in page.
    browser.open(&format!("{base}/console")).await;
    assert_eq!(browser.path().await, "/console/login");
    browser.sign_in(&base, OPERATOR).await;
    assert_eq!(browser.path().await, "/console");
    browser
        .until_shows(&["Overview", "Sagas by state"], false)
        .await;

    // Orders down every saga path, placed while the overview is open.
    let (status, body) = call(
        &app,
        CLIENT,
        "/inventory/SKU-B/receipts",
        json!({"quantity": 100}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let happy = place(&app, "tok_approve", "SKU-B", 1).await;
    let flaky = place(&app, "tok_flaky", "SKU-B", 1).await;
    let declined = place(&app, "tok_decline", "SKU-B", 1).await;
    let unstocked = place(&app, "tok_approve", "SKU-NONE", 1).await;
    let timed_out = place(&app, "tok_timeout", "SKU-B", 1).await;
    let refund_fails = place(&app, "tok_refund_fails", "SKU-B", 1).await;
    until_saga(&app, &happy, &["confirmed"]).await;
    let (status, body) = call(&app, CLIENT, &format!("/orders/{happy}/ship"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    until_saga(&app, &refund_fails, &["confirmed"]).await;
    let (status, body) = call(
        &app,
        CLIENT,
        &format!("/orders/{refund_fails}/cancel"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    until_saga(&app, &happy, &["completed"]).await;
    until_saga(&app, &flaky, &["confirmed"]).await;
    until_saga(&app, &declined, &["rejected"]).await;
    until_saga(&app, &unstocked, &["rejected"]).await;
    until_saga(&app, &timed_out, &["rejected"]).await;
    until_saga(&app, &refund_fails, &["needs_attention"]).await;

    // The overview refreshed itself (no reload): the counts, the saga needing attention, and
    // the charts of events, finished sagas and sagas in flight.
    let overview = browser
        .until_shows(
            &[
                "1 need attention",
                "completed",
                "rejected",
                "needs_attention",
            ],
            false,
        )
        .await;
    assert!(overview.contains("Activity"), "{overview}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let charts = browser
            .client
            .find_all(Locator::Css("figure.chart svg[role=img]"))
            .await
            .expect("charts");
        let mut labels = Vec::new();
        for chart in &charts {
            labels.push(
                chart
                    .attr("aria-label")
                    .await
                    .expect("label")
                    .unwrap_or_default(),
            );
        }
        let alert = browser
            .client
            .find_all(Locator::Css("figure.chart rect.s-alert"))
            .await
            .expect("bars");
        if labels.len() == 3
            && labels[2].contains("needs_attention 1")
            && !alert.is_empty()
            && !labels[0].contains("events 0")
            && !labels[1].contains("finished 0")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the charts never showed the events, the finished sagas and the one needing attention: {labels:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    browser.screenshot("overview").await;

    // From the overview to the list of sagas needing attention, to the saga's steps.
    browser
        .click("a[href='/console/sagas?state=needs_attention']")
        .await;
    browser.until_shows(&[refund_fails.as_str()], false).await;
    browser.screenshot("sagas").await;
    browser
        .click(&format!("a[href='/console/sagas/{refund_fails}']"))
        .await;
    let saga = browser
        .until_shows(
            &[
                "needs_attention",
                "refund",
                "parked",
                "Retry the parked step",
            ],
            false,
        )
        .await;
    assert!(saga.contains("release:SKU-B"), "{saga}");
    assert!(
        saga.contains("Order, payment and stock now") && saga.contains("captured"),
        "the saga's page shows its order, payment and stock: {saga}"
    );
    let compensations = browser
        .client
        .find_all(Locator::Css("tr.compensation"))
        .await
        .expect("rows");
    assert!(
        compensations.len() >= 2,
        "the refund and the release are marked as compensations"
    );
    browser.screenshot("saga").await;

    // The retry, with the keyboard: Enter on the button, then the confirmation.
    let retry = browser
        .client
        .find(Locator::Css("form.action button"))
        .await
        .expect("the retry button");
    retry.send_keys(ENTER).await.expect("press Enter");
    browser.confirm().await;
    browser.until_shows(&["State\ncancelled"], true).await;
    assert_eq!(
        until_saga(&app, &refund_fails, &["cancelled"]).await,
        "cancelled"
    );

    // Follow the request: the order's timeline, then its correlation's flow across services.
    browser
        .click(&format!("a[href='/console/audit/order/{refund_fails}']"))
        .await;
    browser
        .until_shows(
            &["order.placed", "order.confirmed", "order.cancelled"],
            true,
        )
        .await;
    browser.click("a[href^='/console/audit?q=']").await;
    let flow = browser
        .until_shows(
            &[
                "Flow of correlation",
                "payment.authorised",
                "stock.reserved",
            ],
            true,
        )
        .await;
    let steps = browser
        .client
        .find_all(Locator::Css("ul.tree li"))
        .await
        .expect("the flow's steps");
    assert!(steps.len() >= 4, "the flow has its steps: {flow}");
    browser.screenshot("audit").await;

    // The order as of version 1: pending.
    browser
        .open(&format!(
            "{base}/console/audit/order/{refund_fails}?version=1"
        ))
        .await;
    browser
        .until_shows(&["State at version 1", "pending"], false)
        .await;

    // Paging: two sagas a page, every saga once, newest change first.
    browser.open(&format!("{base}/console/sagas?limit=2")).await;
    let mut seen = Vec::new();
    loop {
        for link in browser
            .client
            .find_all(Locator::Css("tbody a[href^='/console/sagas/']"))
            .await
            .expect("links")
        {
            seen.push(link.text().await.expect("text"));
        }
        match browser.client.find(Locator::Css("a[rel=next]")).await {
            Ok(next) => next.click().await.expect("next page"),
            Err(_) => break,
        }
        assert!(seen.len() < 20, "the pages end");
    }
    let mut expected = vec![
        happy.clone(),
        flaky.clone(),
        declined.clone(),
        unstocked.clone(),
        timed_out.clone(),
        refund_fails.clone(),
    ];
    expected.sort();
    let mut listed = seen.clone();
    listed.sort();
    assert_eq!(
        listed, expected,
        "every saga once across the pages: {seen:?}"
    );
    assert_eq!(seen[0], refund_fails, "the latest change first");

    // A parked event: an order confirmed that was never placed. Retried (it fails again), then
    // skipped, from the projections page.
    let ghost = uuid::Uuid::now_v7().to_string();
    let topic = event_log::topics::events(&app.settings.store.topic_prefix, "order");
    let position = app
        .log()
        .await
        .append(
            &topic,
            partition_for(&ghost, app.settings.partitions),
            crate::read_models::crafted(&ghost, 1, &OrderEvent::Confirmed(OrderConfirmed {})),
        )
        .await
        .expect("append");
    browser.open(&format!("{base}/console/projections")).await;
    browser
        .until_shows(&[ghost.as_str(), "Parked events"], true)
        .await;
    browser
        .client
        .execute("document.querySelector('h3').scrollIntoView();", vec![])
        .await
        .expect("scroll to the parked events");
    browser.screenshot("projections").await;
    let row = format!("//tr[td[contains(., '{ghost}')]]");
    browser
        .client
        .find(Locator::XPath(&format!("{row}//button[text()='Retry']")))
        .await
        .expect("the retry button")
        .click()
        .await
        .expect("click");
    browser.confirm().await;
    browser.until_shows(&["still parked"], false).await;
    browser.open(&format!("{base}/console/projections")).await;
    browser
        .client
        .find(Locator::XPath(&format!("{row}//button[text()='Skip']")))
        .await
        .expect("the skip button")
        .click()
        .await
        .expect("click");
    browser.confirm().await;
    browser
        .until_shows(
            &[&format!("Skipped the event at offset {}", position.offset)],
            false,
        )
        .await;
    browser.open(&format!("{base}/console/projections")).await;
    assert!(
        !browser.text().await.contains(&ghost),
        "the skipped event is gone"
    );

    // 390 pixels wide: every page fits; wide tables scroll inside themselves.
    browser
        .client
        .set_window_size(390, 844)
        .await
        .expect("narrow window");
    for path in [
        "/console".to_owned(),
        "/console/sagas".to_owned(),
        format!("/console/sagas/{refund_fails}"),
        "/console/projections".to_owned(),
        format!("/console/audit?q={refund_fails}"),
    ] {
        browser.open(&format!("{base}{path}")).await;
        assert!(browser.fits_width().await, "{path} is wider than 390 px");
        if path == "/console" {
            browser.screenshot("overview-390").await;
        }
    }
    browser
        .client
        .set_window_size(1280, 900)
        .await
        .expect("wide window");

    // The auditor: the audit pages, nothing else.
    browser.sign_in(&base, AUDITOR).await;
    browser.open(&format!("{base}/console/sagas")).await;
    browser.until_shows(&["Refused"], false).await;
    browser
        .open(&format!("{base}/console/audit?q={refund_fails}"))
        .await;
    browser.until_shows(&["order.cancelled"], false).await;
    // The client: no page at all.
    browser.sign_in(&base, CLIENT).await;
    for path in ["/console", "/console/audit"] {
        browser.open(&format!("{base}{path}")).await;
        browser.until_shows(&["Refused"], false).await;
    }

    browser
        .client
        .clone()
        .close()
        .await
        .expect("close the browser");
    app.stop().await;
}
