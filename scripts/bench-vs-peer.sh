#!/usr/bin/env bash
# Side by side on this machine's Postgres, in one run:
#   1. the peer harness in ../shared/peers/cqrs-es-bench (cqrs-es 0.5 + postgres-es 0.5; built
#      with CARGO_TARGET_DIR outside ../shared): 20,000 commands, 1,000 SKUs, 32 tasks;
#   2. the whole platform (`platform serve`, release build) on a fresh nisshi broker and
#      Postgres, under the same mix sent by wrk (scripts/wrk/inventory.lua: 30 % receipts of
#      1-20 units, 70 % decrements of 1-5 units, 32 connections) for DURATION seconds;
#   3. then the inventory read model against a replay of the log (`platform replay --diff`):
#      the rows that differ.
# Prints the peer's JSON line, wrk's summary and the diff's verdict.
#
#   scripts/bench-vs-peer.sh [DURATION]      # default 30
#   PLATFORM_BIN=/path/to/platform scripts/bench-vs-peer.sh   # another build of the platform
#   PLATFORM_PART=inventory scripts/bench-vs-peer.sh   # only the inventory service (no read
#                                            # models, no saga): the command side's own bound
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
root="$(cd "$here/.." && pwd -P)"
duration="${1:-30}"
peer_dir="${PEER_DIR:-$root/../shared/peers/cqrs-es-bench}"
peer_target="${PEER_TARGET_DIR:-${TMPDIR:-/tmp}/cqrs-es-bench-target}"
port="${BENCH_PORT:-18600}"
bin="${PLATFORM_BIN:-$root/target/release/platform}"
pg="postgres://postgres@127.0.0.1:5432"

log() { printf 'bench-vs-peer.sh: %s\n' "$*" >&2; }

"$here/postgres.sh" ensure >&2
"$here/kafka.sh" install >&2
if ! command -v wrk >/dev/null 2>&1; then
    log "installing wrk"
    apt-get update -qq >&2 && apt-get install -y -qq wrk >&2
fi

log "building the peer (target dir $peer_target) and the platform (release)"
(cd "$peer_dir" && CARGO_TARGET_DIR="$peer_target" cargo build --release --locked >&2)
if [[ -z "${PLATFORM_BIN:-}" ]]; then
    (cd "$root" && cargo build --release --bin platform >&2)
fi

psql "$pg/postgres" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'cqrs_bench'" | grep -q 1 \
    || psql "$pg/postgres" -qc "CREATE DATABASE cqrs_bench" >&2
log "peer: 20,000 commands at concurrency 32"
DATABASE_URL="$pg/cqrs_bench" "$peer_target/release/cqrs-es-bench" --concurrency 32 | head -n 2

dir="$(mktemp -d "${TMPDIR:-/tmp}/bench-vs-peer.XXXXXX")"
brokers="$("$here/kafka.sh" start "$dir")"
prefix="peer$RANDOM$RANDOM"
settings=(--kafka "$brokers" --database-url "$pg/test" --topic-prefix "$prefix" --schema-prefix "${prefix}_")
part="${PLATFORM_PART:-all}"
PLATFORM_AUTH=off RUST_LOG=warn "$bin" serve "$part" "${settings[@]}" \
    --http-addr "127.0.0.1:$port" >"$dir/platform.log" 2>&1 &
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
log "platform: wrk, 2 threads, 32 connections, ${duration} s"
broker_pid="$(cat "$dir/broker.pid" 2>/dev/null || pgrep -f "listener-url tcp://$brokers" | head -n 1)"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
cpu_total() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
b0="$(ticks "$broker_pid")"; p0="$(ticks "$platform_pid")"; m0="$(cpu_total)"; t0="$(date +%s.%N)"
wrk -t2 -c32 -d"${duration}s" -s "$here/wrk/inventory.lua" "http://127.0.0.1:$port" | tail -n 2
b1="$(ticks "$broker_pid")"; p1="$(ticks "$platform_pid")"; m1="$(cpu_total)"; t1="$(date +%s.%N)"
awk -v b="$((b1 - b0))" -v p="$((p1 - p0))" -v m="$((m1 - m0))" -v hz="$(getconf CLK_TCK)" -v t0="$t0" -v t1="$t1" \
    'BEGIN { s = t1 - t0; printf "cpu during the load: broker %.2f cores, platform %.2f cores, machine %.2f cores busy\n", b / hz / s, p / hz / s, m / hz / s }'
log "waiting for the read models to catch up"
for _ in $(seq 1 600); do
    curl -sf "127.0.0.1:$port/health/ready" >/dev/null && break
    sleep 0.5
done
sleep 2
kill "$platform_pid" 2>/dev/null || true
wait "$platform_pid" 2>/dev/null || true
if [[ "$part" != all ]]; then
    echo "read model vs replay: not checked (serve $part builds no read model)"
    exit 0
fi
log "inventory read model against a replay of the log"
if "$bin" replay "${settings[@]}" --projection inventory --diff >"$dir/diff.txt" 2>&1; then
    echo "read model vs replay: 0 rows differ"
else
    echo "read model vs replay: rows differ (or the diff failed):"
    head -n 20 "$dir/diff.txt"
fi
