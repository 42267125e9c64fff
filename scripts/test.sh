#!/usr/bin/env bash
# Set up and run the whole test suite on a Debian machine with Python 3.11+:
# Mosquitto from Debian if it is missing (the MQTT tests start their own on
# free loopback ports), Chromium and chromedriver if missing (the labelling
# page's browser test), a virtual environment, then pytest (arguments pass on).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=""
if ! command -v mosquitto >/dev/null 2>&1; then PKGS="mosquitto"; fi
if [ ! -x /usr/bin/chromedriver ]; then PKGS="$PKGS chromium chromium-driver"; fi
if [ -n "$PKGS" ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    $SUDO apt-get install -y -qq $PKGS >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
