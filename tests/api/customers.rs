//! Customers: registration, a change of email address and erasure, on every backend, with the
//! personal fields never in the log in the clear and unreadable from every record once erased.

use domain::CustomerId;
use domain::customer::Sealed;
use personal_data::{KeyStore, Opened, open};
use serde_json::{Value, json};

use crate::helpers::{TestApp, backends, operator_command, read_records};

const NAME: &str = "Ada Lovelace";
const EMAIL: &str = "ada.lovelace@example.com";
const NEW_EMAIL: &str = "countess@example.org";

/// Every record of the customer topic's partitions: its raw bytes (key, headers and value) and
/// its event's data.
async fn raw_customer_records(app: &TestApp) -> Vec<(Vec<u8>, Value)> {
    let log = app.log().await;
    let topic = event_log::topics::events(&app.settings.store.topic_prefix, "customer");
    let mut records = Vec::new();
    for partition in 0..app.settings.partitions {
        for record in read_records(&log, &topic, partition).await {
            let mut raw = record.record.value.clone();
            raw.extend_from_slice(record.record.key.as_bytes());
            for header in &record.record.headers {
                raw.extend_from_slice(header.name.as_bytes());
                raw.extend_from_slice(header.value.as_bytes());
            }
            let envelope: Value =
                serde_json::from_slice(&record.record.value).expect("a CloudEvent");
            records.push((raw, envelope["data"].clone()));
        }
    }
    records
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// `platform customers erasure-report <id> --json` against the app's stores: its exit status and
/// its report.
async fn erasure_report(app: &TestApp, id: &str) -> (bool, Value) {
    let mut command = operator_command(
        &app.settings,
        &["customers", "erasure-report", id, "--json"],
    );
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run platform customers erasure-report");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!(
            "a JSON report, not {stdout:?} ({error}); stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), report)
}

fn place<'a>(report: &'a Value, prefix: &str) -> &'a Value {
    report["places"]
        .as_array()
        .expect("places")
        .iter()
        .find(|place| {
            place["place"]
                .as_str()
                .is_some_and(|p| p.starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("no place {prefix:?} in {report}"))
}

async fn key_store(app: &TestApp) -> KeyStore {
    let db = match &app.settings.store.database_url {
        Some(url) => {
            sql_store::Db::postgres(url, &format!("{}keys", app.settings.store.schema_prefix), 2)
                .await
                .expect("the key store's schema")
        }
        None => sql_store::Db::sqlite_secure(&app.settings.store.data_dir.join("keys.db"))
            .await
            .expect("the key store's file"),
    };
    KeyStore::open(db).await.expect("the key store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_is_stored_sealed_and_erasure_leaves_every_record_unreadable() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let registered = app
            .post("/customers", json!({"name": NAME, "email": EMAIL}))
            .await;
        let body = registered.expect(201).clone();
        let id = body["customer_id"]
            .as_str()
            .expect("customer_id")
            .to_owned();
        assert_eq!(body["aggregate_type"], "customer");
        assert_eq!(body["version"], 1);
        assert_eq!(
            registered.header("location"),
            Some(format!("/customers/{id}").as_str())
        );
        let changed = app
            .client
            .patch(app.url(&format!("/customers/{id}")))
            .json(&json!({"email": NEW_EMAIL}))
            .send()
            .await
            .expect("PATCH");
        assert_eq!(changed.status(), 200, "{backend:?}");
        let changed: Value = changed.json().await.expect("JSON");
        assert_eq!(changed["version"], 2);
        let token = changed["consistency_token"].as_str().expect("a token");
        let view = app.get(&format!("/customers/{id}?after={token}")).await;
        let view = view.expect(200);
        assert_eq!(view["status"], "registered", "{backend:?}");
        assert_eq!(view["name"], NAME);
        assert_eq!(view["email"], NEW_EMAIL);
        assert_eq!(view["personal_data"], "readable");

        // The log holds the fields sealed, never in the clear.
        let records = raw_customer_records(&app).await;
        assert_eq!(records.len(), 2, "{backend:?}");
        for (raw, _) in &records {
            for plain in [NAME, EMAIL, NEW_EMAIL, "ada.lovelace", "Lovelace"] {
                assert!(
                    !contains(raw, plain),
                    "{plain:?} in a record on {backend:?}"
                );
            }
        }
        let customer = CustomerId::parse(&id).expect("an id");
        let keys = key_store(&app).await;
        let key = keys.key(&customer).await.expect("the key");
        let name = Sealed::parse(records[0].1["name"].as_str().expect("name")).expect("sealed");
        let email = Sealed::parse(records[1].1["email"].as_str().expect("email")).expect("sealed");
        assert_eq!(open(&key, &customer, "name", &name).text(), Some(NAME));
        assert_eq!(
            open(&key, &customer, "email", &email).text(),
            Some(NEW_EMAIL)
        );

        // Before the erasure the report finds the fields readable, and says so by its status.
        let (erased, report) = erasure_report(&app, &id).await;
        assert!(!erased, "{backend:?}: {report}");
        assert_eq!(report["nothing_readable"], false);
        assert_eq!(place(&report, "log ")["sealed"], 3, "{report}");
        assert_eq!(place(&report, "log ")["readable"], 3, "{report}");

        // Erased: the key is gone, every record is unreadable, and the erasure is an event.
        let erased = app.post(&format!("/customers/{id}/erase"), json!({})).await;
        assert_eq!(erased.expect(200)["version"], 3, "{backend:?}");
        let again = app.post(&format!("/customers/{id}/erase"), json!({})).await;
        assert_eq!(again.expect(200)["outcome"], "unchanged");
        let key = keys.key(&customer).await.expect("the key");
        assert_eq!(open(&key, &customer, "name", &name), Opened::Erased);
        assert_eq!(open(&key, &customer, "email", &email), Opened::Erased);
        let records = raw_customer_records(&app).await;
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].1, json!({"customer_id": id}));
        let token = erased.expect(200)["consistency_token"]
            .as_str()
            .expect("a token")
            .to_owned();
        let view = app.get(&format!("/customers/{id}?after={token}")).await;
        let view = view.expect(200);
        assert_eq!(view["status"], "erased", "{backend:?}");
        assert_eq!(view["name"], Value::Null);
        assert_eq!(view["email"], Value::Null);
        assert_eq!(view["personal_data"], "erased");
        assert!(view["erased_at"].is_string());
        // The read model's row keeps no sealed field either.
        let rows = app
            .read
            .as_ref()
            .expect("the read side")
            .dump("customers", "customers", "customer_id")
            .await
            .expect("the customers table");
        assert_eq!(rows.len(), 1);
        assert!(
            rows[0]
                .iter()
                .all(|column| !column.starts_with(Sealed::PREFIX)),
            "{rows:?}"
        );
        app.get("/customers/no-such-customer")
            .await
            .expect_problem(404);

        // The report finds the sealed copies (the audit's too, once caught up) and none readable.
        let caught_up = app
            .read
            .as_ref()
            .expect("the read side")
            .wait_caught_up(std::time::Duration::from_secs(30))
            .await
            .expect("the projections' status");
        assert!(caught_up, "{backend:?}: the read models caught up");
        let (erased, report) = erasure_report(&app, &id).await;
        assert!(erased, "{backend:?}: {report}");
        assert_eq!(report["nothing_readable"], true);
        assert!(
            report["key"]
                .as_str()
                .expect("key")
                .starts_with("erased at")
        );
        let log = place(&report, "log ");
        assert_eq!(
            log["holds"].as_str().expect("holds").split(' ').next(),
            Some("3")
        );
        assert_eq!(
            (log["sealed"].as_u64(), log["readable"].as_u64()),
            (Some(3), Some(0))
        );
        let audit = place(&report, "read model audit");
        assert_eq!(
            (audit["sealed"].as_u64(), audit["readable"].as_u64()),
            (Some(3), Some(0)),
            "{report}"
        );
        let customers = place(&report, "read model customers");
        assert_eq!(customers["sealed"], 0, "{report}");

        // No file and no table of the platform's holds the fields in the clear.
        let mut files = vec![app.settings.store.data_dir.clone()];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).expect("the data directory") {
                    files.push(entry.expect("an entry").path());
                }
            } else if let Ok(bytes) = std::fs::read(&path) {
                for plain in [NAME, EMAIL, NEW_EMAIL] {
                    assert!(!contains(&bytes, plain), "{plain:?} in {}", path.display());
                }
            }
        }
        if let Some(url) = &app.settings.store.database_url {
            let db = sql_store::Db::postgres(url, "public", 1)
                .await
                .expect("Postgres");
            let tables = db
                .fetch_all(
                    "SELECT table_schema || '.' || table_name AS name FROM information_schema.tables
                     WHERE table_schema LIKE $1 || '%' AND table_type = 'BASE TABLE'",
                    &[app.settings.store.schema_prefix.as_str().into()],
                )
                .await
                .expect("the platform's tables");
            assert!(tables.len() > 10, "{tables:?}");
            for table in tables {
                let name = table.text("name");
                let (schema, table) = name.split_once('.').expect("schema.table");
                let rows = db
                    .fetch_all(
                        &format!("SELECT t::text AS row FROM \"{schema}\".\"{table}\" t"),
                        &[],
                    )
                    .await
                    .expect("a table's rows");
                for row in rows {
                    let row = row.text("row");
                    for plain in [NAME, EMAIL, NEW_EMAIL] {
                        assert!(!row.contains(plain), "{plain:?} in {name}");
                    }
                }
            }
        }

        // Nothing more is taken for an erased customer; an unknown one is not found.
        let refused = app
            .client
            .patch(app.url(&format!("/customers/{id}")))
            .json(&json!({"email": EMAIL}))
            .send()
            .await
            .expect("PATCH");
        assert_eq!(refused.status(), 409);
        app.post("/customers/no-such-customer/erase", json!({}))
            .await
            .expect_problem(404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_personal_fields_are_refused_with_the_field_named() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        for (body, field) in [
            (json!({"name": "", "email": EMAIL}), "name"),
            (json!({"name": "  ", "email": EMAIL}), "name"),
            (json!({"name": "x".repeat(201), "email": EMAIL}), "name"),
            (json!({"name": NAME, "email": "not an address"}), "email"),
            (
                json!({"name": NAME, "email": "Ada <ada@example.com>"}),
                "email",
            ),
            (
                json!({"name": NAME, "email": format!("{}@example.com", "a".repeat(250))}),
                "email",
            ),
        ] {
            let problem = app.post("/customers", body.clone()).await;
            let problem = problem.expect_problem(422);
            assert!(
                problem.to_string().contains(field),
                "{body} → {problem} names {field}"
            );
        }
        app.post("/customers", json!({"name": NAME}))
            .await
            .expect_problem(422);
        // Nothing was registered, so nothing was written.
        assert!(raw_customer_records(&app).await.is_empty(), "{backend:?}");
        // A retried registration with its idempotency key is the same customer.
        let key = [("Idempotency-Key", "register-ada")];
        let first = app
            .post_with("/customers", json!({"name": NAME, "email": EMAIL}), &key)
            .await;
        let retried = app
            .post_with("/customers", json!({"name": NAME, "email": EMAIL}), &key)
            .await;
        assert_eq!(
            first.expect(201)["customer_id"],
            retried.expect(201)["customer_id"]
        );
        assert_eq!(retried.expect(201)["outcome"], "repeated");
        app.post_with(
            "/customers",
            json!({"name": NAME, "email": NEW_EMAIL}),
            &key,
        )
        .await
        .expect_problem(422);
        assert_eq!(raw_customer_records(&app).await.len(), 1);
    }
}
