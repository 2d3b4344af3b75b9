#!/usr/bin/env bash
# `make test`: every tier, in two phases, on a 2-core machine in about 30 minutes.
#   1. tests/chaos alone: it restarts Redis and PostgreSQL and SIGKILLs workers, which nothing
#      else may be running beside.
#   2. tests/cloud in one pytest process beside tests/unit, tests/integration and tests/e2e in
#      another: much of both is waiting (sandboxes booting, SSH, Keystone and Swift round trips,
#      serving under load), and they share nothing but the machine: their own data dirs, sandbox
#      roots, Redis databases (cloud 11-12, e2e 7 and 9, unit and integration 8 and 13), queues
#      and PostgreSQL databases; sandbox slots are allocated machine-wide under a lock.
# The cloud tier's output follows the other's. Arguments go to every pytest (PYTEST_ARGS).
# Exit status: 0 when every phase passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rc=0

echo "== phase 1: tests/chaos (alone)"
"$PY" -m pytest tests/chaos "$@" || rc=1

echo "== phase 2: tests/cloud beside tests/unit tests/integration tests/e2e"
cloud_log=$(mktemp /tmp/stackml-test-cloud.XXXXXX.log)
# job control on: a background job of a script otherwise starts with SIGINT ignored, and so
# would every `stackml up` the tier stops with Ctrl-C (SIGINT), as a user does
set -m
"$PY" -m pytest tests/cloud "$@" >"$cloud_log" 2>&1 &
cloud=$!
set +m
# the cloud tier is stopped with this script (Ctrl-C, CI's timeout), not left running
trap 'kill -INT "$cloud" 2>/dev/null; wait "$cloud"; exit 130' INT TERM
"$PY" -m pytest tests/unit tests/integration tests/e2e "$@" || rc=1
wait "$cloud" || rc=1
trap - INT TERM
echo "== tests/cloud (ran beside the above)"
cat "$cloud_log"
rm -f "$cloud_log"
[ "$rc" -eq 0 ] && echo "== every tier passed" || echo "== a tier failed (see above)"
exit "$rc"
