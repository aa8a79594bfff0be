#!/usr/bin/env bash
# Make a headless Chromium available for the browser test (tests/test_webui.py, `make test-browser`).
#
#   bash scripts/install_browser.sh            # prints the browser it found or installed
#
# Order: a Chromium / Chrome already on PATH (GitHub's ubuntu runners ship google-chrome) -> Debian's `chromium`
# package via apt-get (as root, or with sudo) -> Playwright's own download (`playwright install --with-deps chromium`,
# needs access to Playwright's CDN). The test finds the first two on PATH and the third in Playwright's cache;
# CHROMIUM_PATH=/path/to/chrome overrides all of them.
set -euo pipefail
PY=${PY:-.venv/bin/python}

found() {
    for name in chromium chromium-browser google-chrome google-chrome-stable; do
        if command -v "$name" >/dev/null && "$name" --version >/dev/null 2>&1; then
            echo "browser: $(command -v "$name") ($("$name" --version 2>/dev/null | tail -n 1))"
            return 0
        fi
    done
    return 1
}

if [[ -n "${CHROMIUM_PATH:-}" ]]; then echo "browser: CHROMIUM_PATH=$CHROMIUM_PATH"; exit 0; fi
found && exit 0

if command -v apt-get >/dev/null; then
    SUDO=""
    if [[ "$(id -u)" -ne 0 ]]; then SUDO="sudo"; fi
    echo "installing Debian's chromium with apt-get ..."
    if $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null
    then
        found && exit 0
    fi
    echo "apt-get could not install a working chromium (on Ubuntu it is a snap); trying Playwright's download" >&2
fi

"$PY" -m playwright install --with-deps chromium
echo "browser: Playwright's chromium ($("$PY" -c 'from playwright.sync_api import sync_playwright as s
with s() as p: print(p.chromium.executable_path)'))"
