#!/usr/bin/env bash
# Local Kafka-protocol broker for tests and CI: nisshi (see /work/shared/KAFKA.md).
#
#   scripts/kafka.sh install      install nisshi 0.8.1 into $HOME/.local/nisshi (once per machine)
#   scripts/kafka.sh start [DIR]  start a broker with durable storage, its files in DIR (default:
#                                 a new temp dir); prints 127.0.0.1:PORT as the only stdout line
#   scripts/kafka.sh stop DIR     stop the broker started in DIR (and drop its storage database)
#
# KAFKA_STORAGE chooses nisshi's durable storage engine:
#   sqlite    (default) a file, DIR/broker.db
#   postgres  a database of its own on the local Postgres ($KAFKA_STORAGE_PG, default
#             postgres://postgres@localhost:5432; nisshi checks TLS certificates against the
#             host name, and the local server's is for localhost), created by start and dropped by stop
#
# Everything except the broker address goes to stderr.
set -euo pipefail

NISSHI_VERSION=0.8.1
NISSHI_ROOT="${NISSHI_ROOT:-$HOME/.local/nisshi}"
NISSHI_BIN="$NISSHI_ROOT/bin/nisshi"
KAFKA_STORAGE="${KAFKA_STORAGE:-sqlite}"
KAFKA_STORAGE_PG="${KAFKA_STORAGE_PG:-postgres://postgres@localhost:5432}"
START_TIMEOUT_SECS=60
STOP_TIMEOUT_SECS=30
INSTALL_WAIT_TIMEOUT_SECS=3600

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    cat >&2 <<'EOF'
usage: scripts/kafka.sh install
       scripts/kafka.sh start [DIR]
       scripts/kafka.sh stop DIR
EOF
    exit 2
}

ensure_cargo_on_path() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
        # shellcheck source=/dev/null
        . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust with rustup first)"
}

nisshi_answers() {
    [[ -x "$NISSHI_BIN" ]] && "$NISSHI_BIN" --version >/dev/null 2>&1
}

other_install_running() {
    pgrep -f "cargo install nisshi" >/dev/null 2>&1
}

wait_for_other_install() {
    local waited=0
    while other_install_running; do
        if ((waited == 0)); then
            log "another 'cargo install nisshi' is running; waiting for it to finish"
        fi
        if ((waited >= INSTALL_WAIT_TIMEOUT_SECS)); then
            die "gave up after ${waited}s waiting for the other 'cargo install nisshi'"
        fi
        sleep 5
        waited=$((waited + 5))
        if ((waited % 60 == 0)); then
            log "still waiting for the other 'cargo install nisshi' (${waited}s)"
        fi
    done
}

cmd_install() {
    if nisshi_answers; then
        log "nisshi already installed: $("$NISSHI_BIN" --version 2>&1 | head -n 1)"
        return 0
    fi
    wait_for_other_install
    if nisshi_answers; then
        log "nisshi installed by the other process: $("$NISSHI_BIN" --version 2>&1 | head -n 1)"
        return 0
    fi
    ensure_cargo_on_path
    mkdir -p "$NISSHI_ROOT"
    # Serialise concurrent runs of this script (the pgrep check above is racy on its own).
    exec 9>"$NISSHI_ROOT/.install.lock"
    flock 9
    if nisshi_answers; then
        log "nisshi installed by a concurrent run: $("$NISSHI_BIN" --version 2>&1 | head -n 1)"
        return 0
    fi
    log "installing nisshi $NISSHI_VERSION into $NISSHI_ROOT (takes ~11 min and ~2 GB of memory)"
    # --ignore-rust-version: one dependency declares rustc 1.96 but builds and runs on 1.95.
    cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version \
        --root "$NISSHI_ROOT" >&2
    nisshi_answers || die "nisshi was installed but '$NISSHI_BIN --version' does not answer"
    log "installed: $("$NISSHI_BIN" --version 2>&1 | head -n 1)"
}

free_port() {
    python3 - <<'EOF'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True while the process exists and is not a zombie (a broker that died during `start` stays a
# zombie child of this script until it exits, and `kill -0` would still succeed on it).
pid_alive() {
    local stat
    stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$stat" && "$stat" != Z* ]]
}

cmd_start() {
    local dir="${1:-}"
    if [[ -z "$dir" ]]; then
        dir="$(mktemp -d "${TMPDIR:-/tmp}/nisshi.XXXXXX")"
    fi
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd -P)"
    nisshi_answers || die "nisshi is not installed ($NISSHI_BIN); run: scripts/kafka.sh install"
    if [[ -f "$dir/broker.pid" ]] && pid_alive "$(cat "$dir/broker.pid")"; then
        die "a broker is already running from $dir (pid $(cat "$dir/broker.pid"))"
    fi

    local storage
    case "$KAFKA_STORAGE" in
    sqlite)
        # Storage URL: nisshi 0.8.1 drops the "/" that starts the URL path and opens the rest
        # relative to its working directory, so `sqlite://$dir/broker.db` (three slashes for an
        # absolute $dir) opens $PWD/tmp/... and fails with "Unable to open connection ... : 14".
        # An absolute path needs FOUR slashes: sqlite:////tmp/x/broker.db. $dir is absolute here.
        storage="sqlite:///$dir/broker.db"
        ;;
    postgres)
        local database
        if [[ -f "$dir/broker.database" ]]; then
            # A restart of the broker of DIR keeps its data.
            database="$(cat "$dir/broker.database")"
        else
            database="nisshi_$(basename "$dir" | tr -c 'a-zA-Z0-9_\n' '_' | tr 'A-Z' 'a-z')_$$"
            psql "$KAFKA_STORAGE_PG/postgres" -v ON_ERROR_STOP=1 -qc "CREATE DATABASE \"$database\"" >&2 ||
                die "cannot create the storage database $database on $KAFKA_STORAGE_PG"
            echo "$database" >"$dir/broker.database"
        fi
        storage="$KAFKA_STORAGE_PG/$database"
        ;;
    *) die "KAFKA_STORAGE must be sqlite or postgres, not '$KAFKA_STORAGE'" ;;
    esac

    local attempt port pid waited
    # A few attempts: the free port can be taken by someone else between choosing and binding.
    for attempt in 1 2 3; do
        port="$(free_port)"
        log "starting nisshi on 127.0.0.1:$port (storage $storage, log $dir/broker.log)"
        # stdin/stdout/stderr are detached so that `$(scripts/kafka.sh start)` returns at once.
        setsid "$NISSHI_BIN" broker \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            --group-initial-rebalance-delay 0s \
            --storage-engine "$storage" \
            </dev/null >>"$dir/broker.log" 2>&1 &
        pid=$!
        echo "$pid" >"$dir/broker.pid"
        echo "$port" >"$dir/broker.port"

        waited=0
        while ! port_open "$port"; do
            if ! pid_alive "$pid"; then
                break
            fi
            if ((waited >= START_TIMEOUT_SECS * 10)); then
                log "broker did not accept connections on 127.0.0.1:$port within ${START_TIMEOUT_SECS}s; log tail:"
                tail -n 50 "$dir/broker.log" >&2 || true
                kill "$pid" 2>/dev/null || true
                rm -f "$dir/broker.pid"
                exit 1
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
        if pid_alive "$pid" && port_open "$port"; then
            log "broker up at 127.0.0.1:$port (pid $pid, after ~$((waited / 10))s)"
            echo "127.0.0.1:$port"
            return 0
        fi
        rm -f "$dir/broker.pid"
        log "broker exited early (attempt $attempt); log tail:"
        tail -n 20 "$dir/broker.log" >&2 || true
        # Retry only when the chosen port got taken in the meantime.
        if ! tail -n 5 "$dir/broker.log" | grep -q "already in use"; then
            exit 1
        fi
    done
    die "could not start the broker (see $dir/broker.log)"
}

cmd_stop() {
    local dir="${1:-}"
    [[ -n "$dir" ]] || usage
    local pidfile="$dir/broker.pid"
    if [[ ! -f "$pidfile" ]]; then
        log "no $pidfile: nothing to stop"
        return 0
    fi
    local pid waited=0
    pid="$(cat "$pidfile")"
    if pid_alive "$pid"; then
        kill "$pid" 2>/dev/null || true
        while pid_alive "$pid"; do
            if ((waited >= STOP_TIMEOUT_SECS * 10)); then
                log "broker (pid $pid) still running after ${STOP_TIMEOUT_SECS}s; sending SIGKILL"
                kill -9 "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
        # Give a SIGKILLed broker a moment to disappear.
        while pid_alive "$pid" && ((waited < (STOP_TIMEOUT_SECS + 5) * 10)); do
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
    rm -f "$pidfile"
    if [[ -f "$dir/broker.database" ]]; then
        local database
        database="$(cat "$dir/broker.database")"
        psql "$KAFKA_STORAGE_PG/postgres" -qc "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >&2 ||
            log "could not drop the storage database $database"
        rm -f "$dir/broker.database"
    fi
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    *) usage ;;
    esac
}

main "$@"
