#!/bin/sh
# Makes sure the browser tests (tests/browser) have Debian's Chromium before `make test` runs them.
# Installs it with apt-get when it is missing and this runs as root (CI does); otherwise says how to
# install it and carries on: the tests then skip, or fail with the same message when CI=true.
set -u
CHROMIUM="${DETLAB_CHROMIUM:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: $CHROMIUM missing; installing Debian's chromium for the browser tests"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
        [ -x "$CHROMIUM" ] && exit 0
    fi
    echo "ensure_chromium: could not install chromium with apt-get; the browser tests will say so" >&2
    exit 0
fi
echo "ensure_chromium: $CHROMIUM missing; install it (sudo apt-get install chromium) to run the browser tests" >&2
exit 0
