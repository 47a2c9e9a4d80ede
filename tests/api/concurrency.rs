//! Many commands at once on one aggregate: no lost update, versions 1..n, conflicts as 409.

use std::collections::BTreeSet;

use serde_json::json;

use crate::helpers::{TestApp, backends};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_commands_on_one_aggregate_take_versions_one_to_fifty() {
    for backend in backends() {
        let app = std::sync::Arc::new(TestApp::spawn(backend).await);
        let requests = (0..50).map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.receive("SKU-HOT", 1).await })
        });
        let mut versions = BTreeSet::new();
        for request in requests.collect::<Vec<_>>() {
            let reply = request.await.expect("request task");
            versions.insert(reply.expect(200)["version"].as_u64().expect("version"));
        }
        assert_eq!(
            versions,
            (1..=50).collect(),
            "{backend:?}: every receipt took its own version"
        );
        // The state saw all of them: the next command is version 51.
        assert_eq!(app.receive("SKU-HOT", 1).await.version(), 51);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_commands_expecting_one_version_let_exactly_one_through() {
    for backend in backends() {
        let app = std::sync::Arc::new(TestApp::spawn(backend).await);
        app.receive("SKU-CAS", 5).await.expect(200);
        let requests = (0..50).map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                app.post_with(
                    "/inventory/SKU-CAS/receipts",
                    json!({"quantity": 1}),
                    &[("If-Match", "\"1\"")],
                )
                .await
            })
        });
        let (mut ok, mut conflicts) = (0, 0);
        for request in requests.collect::<Vec<_>>() {
            let reply = request.await.expect("request task");
            match reply.status {
                200 => {
                    ok += 1;
                    assert_eq!(reply.version(), 2);
                }
                409 => {
                    conflicts += 1;
                    assert_eq!(reply.body["expected_version"], 1);
                    assert_eq!(reply.body["actual_version"], 2);
                }
                other => panic!("{backend:?}: unexpected {other}: {}", reply.body),
            }
        }
        assert_eq!((ok, conflicts), (1, 49), "{backend:?}");
    }
}
