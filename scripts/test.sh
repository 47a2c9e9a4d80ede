#!/usr/bin/env bash
# THE one command that runs the whole test suite, on a fresh machine too:
#   installs the nisshi broker, schemathesis and headless Chromium if missing, makes sure Postgres is up, starts a
#   throwaway broker, then runs `cargo test --workspace --all-targets [ARGS...]` and
#   `cargo test --workspace --doc`.
# Tests needing Kafka or Postgres fail (instead of skipping) because TEST_REQUIRE_BACKENDS=1.
# The exit status is cargo's; the broker is always stopped on exit.
#
#   scripts/test.sh                     # everything
#   scripts/test.sh -p some-crate       # extra args go to the first `cargo test`
#   scripts/test.sh -- --nocapture
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
root="$(cd "$here/.." && pwd -P)"
cd "$root"

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

"$here/kafka.sh" install
"$here/schemathesis.sh" install
"$here/chromium.sh" install
"$here/postgres.sh" ensure

kafka_dir="$(mktemp -d "${TMPDIR:-/tmp}/test-kafka.XXXXXX")"
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    # Quiet, so that cargo's summary stays the closing lines of the log.
    "$here/kafka.sh" stop "$kafka_dir" 2>/dev/null || true
    # Keep the broker's data and log for a look when something failed.
    if [[ "$rc" -eq 0 ]]; then
        rm -rf "$kafka_dir"
    fi
    return "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

brokers="$("$here/kafka.sh" start "$kafka_dir")"

export TEST_KAFKA_BROKERS="$brokers"
export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/test"
export TEST_REQUIRE_BACKENDS=1
# Platforms the tests start as processes on Kafka would require credentials by default;
# tests/infra covers authentication, the other tests talk without it.
export PLATFORM_AUTH=off

echo "cargo:  $(cargo --version)"
echo "rustc:  $(rustc --version)"
echo "nisshi: $("${NISSHI_ROOT:-$HOME/.local/nisshi}/bin/nisshi" --version 2>&1 | head -n 1)"
echo "TEST_KAFKA_BROKERS=$TEST_KAFKA_BROKERS (broker log: $kafka_dir/broker.log, kept on failure)"
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null | head -n 1)"
echo "TEST_DATABASE_URL=$TEST_DATABASE_URL"
echo "TEST_REQUIRE_BACKENDS=$TEST_REQUIRE_BACKENDS"

status=0
cargo test --workspace --all-targets --no-fail-fast "$@" || status=$?
# On failure stop here, so the failing run's summary is the closing line of the log.
if [[ "$status" -eq 0 ]]; then
    cargo test --workspace --doc || status=$?
fi
exit "$status"
