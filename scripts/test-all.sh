#!/usr/bin/env bash
# `make test`: every tier, in two phases of two pytest processes each: about 26 minutes on a
# 2-core machine (it was about 30 with the chaos tier alone first).
#   1. tests/chaos beside tests/unit. The chaos tier SIGKILLs its own platform's workers and
#      sandboxes, shuts down and restarts its own redis-server (tests/chaos/conftest.py) and
#      restarts the machine's PostgreSQL, which the unit tier does not use (SQLite files; its
#      Redis is the machine's, databases 8 and 13).
#   2. tests/cloud, then the chaos tier's schedule test (it mostly waits for minute boundaries),
#      in one process, beside tests/integration and tests/e2e in another: much of both is
#      waiting (sandboxes booting, SSH, Keystone and Swift round trips, serving under load), and
#      they share nothing but the machine: their own data dirs, sandbox roots, Redis databases
#      (cloud 11-12, e2e 7 and 9, integration 8 and 13; chaos its own server), queues and
#      PostgreSQL databases; sandbox slots are allocated machine-wide under a lock.
# Each phase's second process's output follows the first's. Arguments go to every pytest
# (PYTEST_ARGS). Exit status: 0 when every phase passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rc=0
BEATS=tests/chaos/test_schedule_beats.py

# beside LABEL "SECOND..." -- "FIRST...": runs pytest on SECOND in the background (its output
# kept aside, printed after) and on FIRST in the foreground; sets rc=1 when either failed
beside() {
  local label=$1 second=$2 log pid
  shift 2
  [ "$1" = "--" ] && shift
  log=$(mktemp /tmp/stackml-test-beside.XXXXXX.log)
  # job control on: a background job of a script otherwise starts with SIGINT ignored, and so
  # would every `stackml up` the tier stops with Ctrl-C (SIGINT), as a user does
  set -m
  # shellcheck disable=SC2086  # SECOND is a list of paths and options
  "$PY" -m pytest $second "${ARGS[@]}" >"$log" 2>&1 &
  pid=$!
  set +m
  # the background process is stopped with this script (Ctrl-C, CI's timeout), not left running
  trap 'kill -INT "$pid" 2>/dev/null; wait "$pid"; exit 130' INT TERM
  "$PY" -m pytest "$@" "${ARGS[@]}" || rc=1
  wait "$pid" || rc=1
  trap - INT TERM
  echo "== $label (ran beside the above)"
  cat "$log"
  rm -f "$log"
}

ARGS=("$@")
echo "== phase 1: tests/unit beside tests/chaos"
beside "tests/chaos" "tests/chaos --ignore=$BEATS" -- tests/unit

echo "== phase 2: tests/integration tests/e2e beside tests/cloud + $BEATS"
beside "tests/cloud + $BEATS" "tests/cloud $BEATS" -- tests/integration tests/e2e

[ "$rc" -eq 0 ] && echo "== every tier passed" || echo "== a tier failed (see above)"
exit "$rc"
