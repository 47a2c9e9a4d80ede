#!/usr/bin/env bash
# Schemathesis, the property-based API tester the test suite checks the OpenAPI contract with.
#
#   scripts/schemathesis.sh install     install schemathesis 4.32.5 into a virtualenv of its own
#                                       ($SCHEMATHESIS_ROOT, default $HOME/.local/platform-schemathesis),
#                                       once per machine; prints nothing on stdout
#   scripts/schemathesis.sh bin         print the path of the installed `schemathesis`
#   scripts/schemathesis.sh run URL [EXAMPLES] [extra schemathesis args...]
#                                       every check (stateful phase included) against URL's
#                                       /openapi.json, with the hooks in scripts/schemathesis/;
#                                       EXAMPLES per operation and phase (default 300)
#
# It needs Python 3.12 or later (3.11's parser fails inside Hypothesis here); PYTHON chooses the
# interpreter, else the newest python3.1x found (pyenv's versions included).
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_ROOT="${SCHEMATHESIS_ROOT:-$HOME/.local/platform-schemathesis}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"

log() { printf 'schemathesis.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

python_at_least_3_12() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null
}

find_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        python_at_least_3_12 "$PYTHON" || die "PYTHON=$PYTHON is not Python 3.12 or later"
        echo "$PYTHON"
        return
    fi
    local candidate
    for candidate in python3.14 python3.13 python3.12 \
        "$HOME"/.pyenv/versions/3.14*/bin/python3 "$HOME"/.pyenv/versions/3.13*/bin/python3 \
        "$HOME"/.pyenv/versions/3.12*/bin/python3 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && python_at_least_3_12 "$candidate"; then
            command -v "$candidate"
            return
        fi
    done
    die "no Python 3.12 or later found (set PYTHON, or install python3.12 or later)"
}

installed() {
    [[ -x "$SCHEMATHESIS_ROOT/bin/schemathesis" ]] \
        && "$SCHEMATHESIS_ROOT/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"
}

install() {
    if installed; then
        return
    fi
    local python
    python="$(find_python)"
    log "installing schemathesis $SCHEMATHESIS_VERSION with $("$python" --version 2>&1) into $SCHEMATHESIS_ROOT"
    rm -rf "$SCHEMATHESIS_ROOT"
    "$python" -m venv "$SCHEMATHESIS_ROOT" >&2
    "$SCHEMATHESIS_ROOT/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION" >&2
    installed || die "schemathesis $SCHEMATHESIS_VERSION did not install"
}

case "${1:-}" in
    install)
        install
        ;;
    bin)
        installed || die "not installed: run scripts/schemathesis.sh install"
        echo "$SCHEMATHESIS_ROOT/bin/schemathesis"
        ;;
    run)
        [[ $# -ge 2 ]] || die "usage: scripts/schemathesis.sh run URL [EXAMPLES] [args...]"
        install
        url="${2%/}"
        examples="${3:-300}"
        shift $(( $# >= 3 ? 3 : 2 ))
        SCHEMATHESIS_HOOKS="$here/schemathesis/hooks.py" exec "$SCHEMATHESIS_ROOT/bin/schemathesis" \
            run "$url/openapi.json" --checks all --max-examples "$examples" --workers 2 \
            --no-color "$@"
        ;;
    *)
        echo "usage: scripts/schemathesis.sh install | bin | run URL [EXAMPLES] [args...]" >&2
        exit 2
        ;;
esac
