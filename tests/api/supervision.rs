//! Every long-running task of a part runs supervised: one that dies (here aborted, as a panic
//! or a loop that gives up would end it) makes the part answer 503 on `/health/ready`, naming
//! the task and why, rather than showing only as a lag that grows without a cause; and a
//! graceful stop ends every task within its bound.

use std::time::{Duration, Instant};

use crate::helpers::{TestApp, backends};

async fn readiness(app: &TestApp) -> (u16, serde_json::Value) {
    let reply = app.get("/health/ready").await;
    (reply.status, reply.body.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_makes_the_part_not_ready_and_says_which() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = readiness(&app).await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{backend:?}: never ready: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let running = app.supervisor.running();
        for task in [
            "projection orders",
            "projection inventory",
            "saga worker",
            "saga ticker",
            "saga relay",
            "order command consumer",
        ] {
            assert!(
                running.iter().any(|name| name == task),
                "{backend:?}: {task} is not supervised: {running:?}"
            );
        }
        assert!(
            running.iter().any(|name| name.starts_with("owner of ")),
            "{backend:?}: the owners are not supervised: {running:?}"
        );

        assert_eq!(app.supervisor.abort("projection orders"), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let body = loop {
            let (status, body) = readiness(&app).await;
            if status == 503 {
                break body;
            }
            assert!(
                Instant::now() < deadline,
                "{backend:?}: still ready 5 s after its orders projection died: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let problems = body["problems"].to_string();
        assert!(
            problems.contains("task projection orders was aborted"),
            "{backend:?}: the readiness answer does not name the dead task: {body}"
        );
        // Not a passing state: it stays not ready until the process is restarted.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(readiness(&app).await.0, 503, "{backend:?}");

        let started = Instant::now();
        app.stop().await;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{backend:?}: the graceful stop took {:?}",
            started.elapsed()
        );
    }
}
