#!/usr/bin/env bash
# Headless Chromium and its WebDriver, the browser the console's tests drive.
#
#   scripts/chromium.sh install   install Debian's `chromium` and `chromium-driver` if missing
#                                 (apt-get, as root or through sudo); prints nothing on stdout
#   scripts/chromium.sh check     exit 0 when both are installed and agree on their version
#
# The tests start chromedriver themselves (tests/browser); they find the binaries at
# $CHROMIUM (default /usr/bin/chromium) and $CHROMEDRIVER (default /usr/bin/chromedriver).
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"

log() { printf 'chromium.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

installed() {
    [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]] || return 1
    # Chromium and its driver come from one source package: their major versions match.
    local browser driver
    browser="$("$CHROMIUM" --version 2>/dev/null | grep -oE '[0-9]+' | head -n 1)" || return 1
    driver="$("$CHROMEDRIVER" --version 2>/dev/null | grep -oE '[0-9]+' | head -n 1)" || return 1
    [[ -n "$browser" && "$browser" == "$driver" ]]
}

install() {
    if installed; then
        return
    fi
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "not root and no sudo: install chromium and chromium-driver with apt-get"
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install Chromium and ChromeDriver, then set CHROMIUM and CHROMEDRIVER"
    log "installing Debian's chromium and chromium-driver (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q >&2
    "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver >&2
    installed || die "chromium and chromium-driver were installed but do not answer --version alike"
    log "$("$CHROMIUM" --version 2>&1 | head -n 1); $("$CHROMEDRIVER" --version 2>&1 | head -n 1)"
}

case "${1:-}" in
    install) install ;;
    check) installed ;;
    *)
        echo "usage: $0 install|check" >&2
        exit 2
        ;;
esac
