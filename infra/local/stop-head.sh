#!/usr/bin/env bash
# Stop the local Ray head started by start-head.sh, and only it: every process whose command line names the
# head's own temp dir (GCS, raylet, dashboard, monitors), with all their descendants (workers, agents, job
# drivers). SIGTERM first so Ray can drain, SIGKILL what is left after 15 s. Never a bare `ray stop`,
# which would stop every Ray node this user runs on the machine.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_FILE="${LATTE_RAY_LOCAL_STATE:-$REPO_ROOT/.cache/infra-local}/head.env"

if [[ ! -f "$STATE_FILE" ]]; then
  echo "no $STATE_FILE: no Ray head started by start-head.sh" >&2
  exit 0
fi
# shellcheck disable=SC1090
source "$STATE_FILE"
[[ -n "${RAY_HEAD_TEMP_DIR:-}" ]] || { echo "$STATE_FILE names no RAY_HEAD_TEMP_DIR" >&2; exit 1; }

descendants() {
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "$child"
    descendants "$child"
  done
}

pids=()
for pid in $(pgrep -f -- "$RAY_HEAD_TEMP_DIR" || true); do
  [[ "$pid" == "$$" ]] && continue
  pids+=("$pid" $(descendants "$pid"))
done

if [[ ${#pids[@]} -eq 0 ]]; then
  echo "Ray head ($RAY_HEAD_TEMP_DIR) is not running" >&2
else
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 150); do
    alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [[ ${#alive[@]} -eq 0 ]] && break
    sleep 0.1
  done
  if [[ ${#alive[@]} -gt 0 ]]; then
    kill -KILL "${alive[@]}" 2>/dev/null || true
  fi
  echo "stopped Ray head ($RAY_HEAD_TEMP_DIR): ${#pids[@]} processes" >&2
fi
rm -f "$STATE_FILE"
