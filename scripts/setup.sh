#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): redis-server for the
# Redis comparison, then a virtualenv in .venv with Pocket and its test and
# benchmark dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: redis-server (the Redis comparison), fio (the flash-tier comparison),
# iproute2 (`ip`: the network-namespace partition tests, run as root).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing ${missing[*]} (Debian packages) for the benchmark comparisons and partition tests" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        # Debian starts a system redis service; the benchmarks run their own server.
        (service redis-server stop || true) >/dev/null 2>&1
    else
        echo "setup: ${missing[*]} not found and cannot apt-get; those comparisons and tests will be skipped" >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,bench]'
echo "setup: done (.venv ready)" >&2
