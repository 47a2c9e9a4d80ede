//! The operator console over HTTP, on both backends: its pages show what the JSON API and the
//! CLI show, its actions do what `POST /sagas/{id}/retry` and `platform parked skip` do, and
//! an action without this browser's anti-forgery token changes nothing.

use std::sync::Arc;
use std::time::Duration;

use domain::order::{OrderConfirmed, OrderEvent};
use event_log::partition_for;
use serde_json::json;

use crate::helpers::{TestApp, backends, settings};

/// A browser: no redirects followed, cookies kept by hand.
struct Browser {
    client: reqwest::Client,
    base: String,
    cookies: Vec<String>,
}

struct Page {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Browser {
    fn new(app: &TestApp) -> Browser {
        Browser {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            base: app.address.clone(),
            cookies: Vec::new(),
        }
    }

    fn keep(&mut self, headers: &reqwest::header::HeaderMap) {
        for value in headers.get_all(reqwest::header::SET_COOKIE) {
            let pair = value
                .to_str()
                .expect("cookie")
                .split(';')
                .next()
                .expect("pair")
                .to_owned();
            let name = pair.split('=').next().expect("name").to_owned();
            self.cookies
                .retain(|kept| !kept.starts_with(&format!("{name}=")));
            self.cookies.push(pair);
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, self.cookies.join("; "))
            .send()
            .await
            .expect("GET");
        self.page(response).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let body = form
            .iter()
            .map(|(key, value)| format!("{key}={}", value.replace(':', "%3A")))
            .collect::<Vec<_>>()
            .join("&");
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, self.cookies.join("; "))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .expect("POST");
        self.page(response).await
    }

    async fn page(&mut self, response: reqwest::Response) -> Page {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        self.keep(&headers);
        let body = response.text().await.expect("body");
        Page {
            status,
            headers,
            body,
        }
    }

    /// The anti-forgery token the console gave this browser.
    fn csrf(&self) -> String {
        self.cookies
            .iter()
            .find_map(|pair| pair.strip_prefix("console_csrf="))
            .expect("a console_csrf cookie")
            .to_owned()
    }
}

fn expect(page: &Page, status: u16, contains: &[&str], what: &str) {
    assert_eq!(page.status, status, "{what}: {}", page.body);
    for text in contains {
        assert!(
            page.body.contains(text),
            "{what} shows {text:?}: {}",
            page.body
        );
    }
}

async fn until_page(browser: &mut Browser, path: &str, text: &str) -> Page {
    until_page_shows(browser, path, &[text]).await
}

/// The page once it shows all of `texts` (the read models it is drawn from catch up).
async fn until_page_shows(browser: &mut Browser, path: &str, texts: &[&str]) -> Page {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = browser.get(path).await;
        if page.status == 200 && texts.iter().all(|text| page.body.contains(text)) {
            return page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never showed {texts:?}: {}",
            page.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_follows_a_parked_saga_in_the_console_and_retries_it_there() {
    for backend in backends() {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut settings = settings(backend, dir.path());
        settings.saga.timeout_ms = 5_000;
        // The refund's resends are parked after about 2 s.
        settings.saga.compensation_timeout_ms = 300;
        let app = TestApp::spawn_with(backend, settings, dir).await;
        app.receive("SKU-C", 10).await.expect(200);
        let placed = app
            .place_order("tok_refund_fails", &[("SKU-C", 2, 1000)])
            .await;
        let order_id = placed.expect(201)["order_id"]
            .as_str()
            .expect("id")
            .to_owned();
        let mut browser = Browser::new(&app);
        until_page(
            &mut browser,
            &format!("/console/sagas/{order_id}"),
            "<dt>State</dt><dd>confirmed</dd>",
        )
        .await;
        app.post(&format!("/orders/{order_id}/cancel"), json!({}))
            .await
            .expect(200);

        // The overview counts it among the sagas that need attention, and refreshes itself.
        let overview = until_page(&mut browser, "/console", "1 need attention").await;
        expect(
            &overview,
            200,
            &[
                "Sagas by state",
                "needs_attention",
                "hx-get=\"/console/overview\"",
                "orders",
            ],
            &format!("{backend:?}: the overview"),
        );
        assert_eq!(
            overview
                .headers
                .get("cache-control")
                .map(|v| v.to_str().unwrap()),
            Some("no-store"),
            "{backend:?}: console pages are not cached"
        );
        let fragment = browser.get("/console/overview").await;
        expect(
            &fragment,
            200,
            &["needs_attention"],
            "the overview's refresh",
        );
        assert!(!fragment.body.contains("<html"), "a fragment, not a page");

        // The list by state, and the saga's steps: the refund parked after its sends, the
        // stock's release done; compensations marked.
        let list = browser.get("/console/sagas?state=needs_attention").await;
        expect(
            &list,
            200,
            &[order_id.as_str()],
            &format!("{backend:?}: the list"),
        );
        let saga = browser.get(&format!("/console/sagas/{order_id}")).await;
        expect(
            &saga,
            200,
            &[
                "needs_attention",
                "reserve:SKU-C",
                "stock.reserved",
                "release:SKU-C",
                "refund",
                "parked",
                "class=\"compensation\"",
                "Retry the parked step",
            ],
            &format!("{backend:?}: the saga"),
        );

        // Without this browser's token, or from another site, the retry changes nothing.
        let retry = format!("/console/sagas/{order_id}/retry");
        let forged = browser
            .post(&retry, &[("csrf", "0123456789abcdef0123456789abcdef")])
            .await;
        expect(&forged, 403, &["anti-forgery"], "a forged retry");
        let mut stranger = Browser::new(&app);
        let csrf = browser.csrf();
        let foreign = stranger.post(&retry, &[("csrf", csrf.as_str())]).await;
        expect(
            &foreign,
            403,
            &["anti-forgery"],
            "a retry without the cookie",
        );
        let still = browser.get(&format!("/console/sagas/{order_id}")).await;
        expect(&still, 200, &["needs_attention"], "nothing changed");

        // The operator retries: the refund's next send succeeds and the saga ends cancelled.
        let retried = browser.post(&retry, &[("csrf", csrf.as_str())]).await;
        assert_eq!(retried.status, 303, "{backend:?}: {}", retried.body);
        until_page(
            &mut browser,
            &format!("/console/sagas/{order_id}"),
            "<dt>State</dt><dd>cancelled</dd>",
        )
        .await;
        let again = browser.post(&retry, &[("csrf", csrf.as_str())]).await;
        expect(&again, 409, &["nothing to retry"], "a second retry");

        // The audit pages: the order's timeline, its state as of version 1, the request's flow.
        until_page_shows(
            &mut browser,
            &format!("/console/audit?q={order_id}"),
            &[
                "order.placed",
                "order.cancelled",
                "payment.authorised",
                "payment.captured",
                "payment.refunded",
            ],
        )
        .await;
        let state = browser
            .get(&format!("/console/audit/order/{order_id}?version=1"))
            .await;
        expect(
            &state,
            200,
            &["State at version 1", "pending"],
            &format!("{backend:?}: the order as of version 1"),
        );

        // Bad input gets a page saying what is wrong, with the right status.
        let bad = browser.get("/console/sagas?state=bogus").await;
        expect(&bad, 400, &["no saga state"], "an unknown state");
        let bad = browser.get("/console/sagas?limit=0").await;
        expect(&bad, 400, &["limit"], "a limit of 0");
        let bad = browser.get("/console/sagas?from=yesterday").await;
        expect(&bad, 400, &["date and time"], "a time that is none");
        let bad = browser.get("/console/sagas?after=nowhere").await;
        expect(
            &bad,
            400,
            &["page position"],
            "a page position that is none",
        );
        // The time filter: nothing changed in the future, this saga changed since an hour ago.
        let later = (chrono::Utc::now() + chrono::Duration::hours(1))
            .format("%Y-%m-%dT%H:%M")
            .to_string();
        let none = browser.get(&format!("/console/sagas?from={later}")).await;
        expect(
            &none,
            200,
            &["No saga matches"],
            "sagas changed in the future",
        );
        let earlier = (chrono::Utc::now() - chrono::Duration::hours(1))
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string();
        let some = browser
            .get(&format!("/console/sagas?from={earlier}&to={later}"))
            .await;
        expect(
            &some,
            200,
            &[order_id.as_str()],
            "sagas changed in the last hour",
        );
        let missing = browser.get("/console/sagas/no-such-order").await;
        expect(&missing, 404, &["no saga"], "an unknown saga");
        let missing = browser.get("/console/audit/order/no-such-order").await;
        assert_eq!(missing.status, 404, "{}", missing.body);
        // Malformed query strings and forms get the console's own page, not plain text.
        for (page, status, what) in [
            (
                browser.get("/console/sagas?state=a&state=b").await,
                400,
                "a repeated parameter",
            ),
            (
                browser.get("/console/audit?q=a&q=b").await,
                400,
                "a repeated search",
            ),
            (
                browser
                    .post("/console/parked", &[("csrf", csrf.as_str())])
                    .await,
                422,
                "a form without its fields",
            ),
        ] {
            assert_eq!(page.status, status, "{what}: {}", page.body);
            assert!(
                page.headers["content-type"]
                    .to_str()
                    .expect("type")
                    .starts_with("text/html")
                    && page.body.contains("Not understood"),
                "{what} gets a console page: {}",
                page.body
            );
        }
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_skips_a_parked_event_in_the_console() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let log = app.log().await;
        let topic = event_log::topics::events(&app.settings.store.topic_prefix, "order");
        // An order confirmed that was never placed: the orders projection parks it.
        let ghost = uuid::Uuid::now_v7().to_string();
        let partition = partition_for(&ghost, app.settings.partitions);
        let position = log
            .append(
                &topic,
                partition,
                crate::read_models::crafted(&ghost, 1, &OrderEvent::Confirmed(OrderConfirmed {})),
            )
            .await
            .expect("append");
        let offset = position.offset;
        let mut browser = Browser::new(&app);
        let page = until_page(&mut browser, "/console/projections", &ghost).await;
        expect(
            &page,
            200,
            &["Parked events", "order.confirmed", "Retry", "Skip"],
            &format!("{backend:?}: the projections page"),
        );
        let position = position.to_string();
        let csrf = browser.csrf();
        let forged = browser
            .post(
                "/console/parked",
                &[
                    ("csrf", "nope"),
                    ("projection", "orders"),
                    ("position", position.as_str()),
                    ("action", "skip"),
                ],
            )
            .await;
        assert_eq!(forged.status, 403, "{}", forged.body);
        let retried = browser
            .post(
                "/console/parked",
                &[
                    ("csrf", csrf.as_str()),
                    ("projection", "orders"),
                    ("position", position.as_str()),
                    ("action", "retry"),
                ],
            )
            .await;
        expect(&retried, 200, &["still parked"], "a retry that fails again");
        let skipped = browser
            .post(
                "/console/parked",
                &[
                    ("csrf", csrf.as_str()),
                    ("projection", "orders"),
                    ("position", position.as_str()),
                    ("action", "skip"),
                ],
            )
            .await;
        expect(
            &skipped,
            200,
            &[format!("Skipped the event at offset {offset}").as_str()],
            "the skip",
        );
        let after = browser.get("/console/projections").await;
        assert!(
            !after.body.contains(&ghost),
            "{backend:?}: the skipped event is no longer listed: {}",
            after.body
        );
        app.stop().await;
    }
}
