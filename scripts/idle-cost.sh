#!/usr/bin/env bash
# The broker's CPU while the platform idles on Kafka + Postgres:
#   starts a fresh nisshi broker (scripts/kafka.sh), `platform serve [PART]` on it with a fresh
#   topic and schema prefix, waits until /health/ready answers and 5 s more, then reads the
#   broker's and the platform's CPU time over 10 s (from /proc) and counts the broker's
#   connections. Prints one line; stops both.
#
#   scripts/idle-cost.sh [PART]          # PART: all (default), order, projections, saga, ...
#   PLATFORM_BIN=target/release/platform scripts/idle-cost.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
root="$(cd "$here/.." && pwd -P)"
part="${1:-all}"
bin="${PLATFORM_BIN:-$root/target/debug/platform}"
database_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
port="${IDLE_PORT:-18555}"

[[ -x "$bin" ]] || { echo "idle-cost.sh: build the platform first ($bin)" >&2; exit 1; }
"$here/postgres.sh" ensure >&2
dir="$(mktemp -d "${TMPDIR:-/tmp}/idle-cost.XXXXXX")"
brokers="$("$here/kafka.sh" start "$dir")"
broker_pid="$(cat "$dir/broker.pid" 2>/dev/null || pgrep -f "listener-url tcp://$brokers" | head -n 1)"
prefix="idle$RANDOM$RANDOM"
PLATFORM_AUTH=off RUST_LOG=warn "$bin" serve "$part" --kafka "$brokers" --database-url "$database_url" \
    --topic-prefix "$prefix" --schema-prefix "${prefix}_" --http-addr "127.0.0.1:$port" \
    >"$dir/platform.log" 2>&1 &
platform_pid=$!
cleanup() {
    kill "$platform_pid" 2>/dev/null || true
    wait "$platform_pid" 2>/dev/null || true
    "$here/kafka.sh" stop "$dir" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 1 240); do
    curl -sf "127.0.0.1:$port/health/ready" >/dev/null && break
    sleep 0.5
done
curl -sf "127.0.0.1:$port/health/ready" >/dev/null || { echo "idle-cost.sh: serve $part never became ready" >&2; exit 1; }
sleep 5
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz="$(getconf CLK_TCK)"
b0="$(ticks "$broker_pid")"; p0="$(ticks "$platform_pid")"; t0="$(date +%s.%N)"
sleep 10
b1="$(ticks "$broker_pid")"; p1="$(ticks "$platform_pid")"; t1="$(date +%s.%N)"
connections="$(ss -tn state established "( sport = :${brokers##*:} )" | tail -n +2 | wc -l)"
awk -v b="$((b1 - b0))" -v p="$((p1 - p0))" -v hz="$hz" -v t0="$t0" -v t1="$t1" -v c="$connections" -v part="$part" \
    'BEGIN { s = t1 - t0; printf "serve %s idle for %.1f s: broker %.3f cores, platform %.3f cores, %d broker connections\n", part, s, b / hz / s, p / hz / s, c }'
