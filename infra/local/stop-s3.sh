#!/usr/bin/env bash
# Stop the moto S3 server started by start-s3.sh (by the PID it recorded).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_DIR="${LATTE_RAY_LOCAL_STATE:-$REPO_ROOT/.cache/infra-local}"
PID_FILE="$STATE_DIR/moto.pid"

if [[ ! -f "$PID_FILE" ]]; then
  echo "no $PID_FILE: moto S3 server not started by start-s3.sh" >&2
  exit 0
fi
pid="$(cat "$PID_FILE")"
if kill -0 "$pid" 2>/dev/null && grep -qa moto "/proc/$pid/cmdline" 2>/dev/null; then
  kill "$pid"
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid"
  fi
  echo "stopped moto S3 server (pid $pid)" >&2
else
  echo "moto S3 server (pid $pid) is not running" >&2
fi
rm -f "$PID_FILE"
