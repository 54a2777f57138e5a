#!/bin/sh
# Install the optional benchmark contestants and tools; every step may fail without
# stopping the others. The harness itself (python -m benchmarks) needs none of them:
# it skips what is missing with a note ("skipped: wget2 not installed").
#
#   sh benchmarks/setup.sh
set -u

if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if $SUDO apt-get update -qq && \
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wget2 aria2 curl; then
        echo "installed: wget2 aria2 curl"
    else
        echo "skipped: apt-get could not install wget2/aria2/curl" >&2
    fi
else
    echo "skipped: no apt-get; install wget2, aria2 and curl by hand" >&2
fi

PYTHON="${PYTHON:-python3}"
# parfive: a contestant; pycurl: fetchpool's curl backend (the fetchpool-curl
# contestant); matplotlib: the PNG chart; py-spy: the profiles.
for package in parfive pycurl matplotlib py-spy; do
    if "$PYTHON" -m pip install -q "$package"; then
        echo "installed: $package"
    else
        echo "skipped: pip could not install $package" >&2
    fi
done
exit 0
