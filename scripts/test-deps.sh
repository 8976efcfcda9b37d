#!/bin/sh
# System packages the test suite needs beyond pip: Debian's Chromium, for the MLflow UI test.
set -e
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || {
        $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
command -v chromium >/dev/null 2>&1 || {
    echo "the MLflow UI test needs Chromium: install Debian's 'chromium' package" >&2; exit 1; }
