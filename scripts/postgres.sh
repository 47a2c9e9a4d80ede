#!/usr/bin/env bash
# Make sure the local Postgres (127.0.0.1:5432, trust auth, user postgres, database test) is up.
#
#   scripts/postgres.sh ensure    start the cluster if it is down and wait until it is ready
#
# Installs nothing: Postgres is expected to be installed on the machine (Debian packages).
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
READY_TIMEOUT_SECS=60

log() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

pg_ready() {
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1
}

cmd_ensure() {
    command -v pg_isready >/dev/null 2>&1 || die "pg_isready not found: Postgres is not installed"
    if pg_ready; then
        log "postgres is ready on $PG_HOST:$PG_PORT"
        return 0
    fi
    [[ -d /etc/postgresql ]] || die "no /etc/postgresql: cannot find a cluster to start"
    local version
    # Normally exactly one version directory; take the newest if there are several.
    version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -n 1)"
    [[ -n "$version" ]] || die "no cluster version under /etc/postgresql"
    log "postgres is down; starting cluster $version/main"
    # Tolerate a failure here (e.g. "already running" while still starting up); readiness decides.
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 ||
        log "pg_ctlcluster returned an error; waiting for readiness anyway"
    local waited=0
    until pg_ready; do
        if ((waited >= READY_TIMEOUT_SECS)); then
            die "postgres not ready on $PG_HOST:$PG_PORT after ${READY_TIMEOUT_SECS}s"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log "postgres is ready on $PG_HOST:$PG_PORT"
}

case "${1:-}" in
ensure) cmd_ensure ;;
*)
    echo "usage: scripts/postgres.sh ensure" >&2
    exit 2
    ;;
esac
