#!/usr/bin/env bash
# Stop the local Ray head started by start-head.sh.
# Note: `ray stop` stops every Ray node this user runs on this machine, not just that one.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if [[ -n "${RAY_BIN:-}" ]]; then
  ray_bin="$RAY_BIN"
elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
  ray_bin="$REPO_ROOT/.venv/bin/ray"
else
  ray_bin="$(command -v ray)" || { echo "ray not found: set RAY_BIN" >&2; exit 1; }
fi

export RAY_AUTH_MODE=disabled
"$ray_bin" stop "$@"             # pass --force to SIGKILL stragglers
