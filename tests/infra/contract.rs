//! The API contract: schemathesis (`scripts/schemathesis.sh`) generates requests from the
//! platform's `/openapi.json` — every check, the stateful phase included — and finds no server
//! error, no schema-valid request rejected, no schema-violating request accepted and no answer
//! the document does not describe, over at least 5,000 cases. The seed is fixed, so a failure
//! reproduces; `scripts/schemathesis.sh run URL` explores with a new one each time.

use std::path::PathBuf;
use std::process::Command;

use platform::Part;

use crate::support;

/// Fewest cases a run must generate.
const MIN_CASES: u64 = 5_000;
/// Examples per operation and phase: about 7,900 cases over the 16 operations.
const EXAMPLES: &str = "300";
const SEED: &str = "83413208614570535267435637201814281433";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/schemathesis.sh")
}

/// Whether schemathesis is installed; without it the test is skipped, unless the suite runs
/// with `TEST_REQUIRE_BACKENDS=1` (`scripts/test.sh`, which installs it).
fn installed() -> bool {
    let found = Command::new("bash")
        .arg(script())
        .arg("bin")
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        assert!(
            std::env::var("TEST_REQUIRE_BACKENDS").as_deref() != Ok("1"),
            "schemathesis is not installed: run scripts/schemathesis.sh install"
        );
        eprintln!("skipped: schemathesis is not installed (scripts/schemathesis.sh install)");
    }
    found
}

/// `N generated, M passed` from the summary.
fn counts(output: &str) -> Option<(u64, u64)> {
    let line = output.lines().find(|line| line.contains(" generated, "))?;
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse::<u64>().ok());
    Some((numbers.next()??, numbers.next()??))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_does_what_its_openapi_document_says() {
    if !installed() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = support::settings(dir.path());
    // One client sends everything: its rate is not what is tested here (429 is documented).
    settings.security.rate_limit = 1e9;
    settings.security.rate_burst = 1_000_000;
    let app = support::platform(settings, Part::All).await;
    let url = app.url();
    // Schemathesis keeps a cache in its working directory: not in the checkout.
    let scratch = tempfile::tempdir().expect("temp dir");
    let workdir = scratch.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(script())
            .args(["run", &url, EXAMPLES, "--seed", SEED])
            .current_dir(workdir)
            .output()
            .expect("run schemathesis")
    })
    .await
    .expect("schemathesis task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "schemathesis found the API and its document disagreeing:\n{report}"
    );
    let (generated, passed) = counts(&stdout).unwrap_or_else(|| panic!("no summary:\n{report}"));
    assert_eq!(generated, passed, "{report}");
    assert!(
        generated >= MIN_CASES,
        "only {generated} cases (at least {MIN_CASES}):\n{report}"
    );
    app.stop().await;
}

#[test]
fn the_summary_gives_the_counts() {
    assert_eq!(
        counts("Test cases:\n  7886 generated, 7886 passed\n"),
        Some((7886, 7886))
    );
    assert_eq!(
        counts("  2789 generated, 3 found 3 unique failures"),
        Some((2789, 3))
    );
    assert_eq!(counts("nothing"), None);
}
