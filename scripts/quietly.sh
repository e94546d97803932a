#!/usr/bin/env bash
# quietly.sh LABEL CMD...: run CMD with its output in a log file; print one line, or the log's tail on failure.
set -uo pipefail
label=$1
shift
mkdir -p .logs
log=".logs/${label// /_}.log"
if "$@" >"$log" 2>&1; then
  echo "$label: ok (log: $log)"
else
  rc=$?
  echo "$label: FAILED (exit $rc); last lines of $log:" >&2
  tail -n 40 "$log" >&2
  exit $rc
fi
