#!/usr/bin/env bash
# Start a single-node Ray head on this machine for `ray job submit`.
#
#   infra/local/start-head.sh            # GCS on 6379 (or a free port if taken), dashboard on 8265
#   RAY_PORT=6380 RAY_DASHBOARD_PORT=8266 RAY_NUM_CPUS=2 infra/local/start-head.sh   # default: every core
#
# Ray 2.60 turns token authentication on by default; this local head binds to 127.0.0.1 only and runs
# with RAY_AUTH_MODE=disabled, so export the same in the shell you submit from.
# To reach the local S3 server from jobs, start it first and source its env file, so every Ray worker
# inherits AWS_ENDPOINT_URL:  infra/local/start-s3.sh && source .cache/infra-local/s3.env
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# The `ray` CLI: $RAY_BIN, else the repo's virtualenv, else PATH.
if [[ -n "${RAY_BIN:-}" ]]; then
  ray_bin="$RAY_BIN"
elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
  ray_bin="$REPO_ROOT/.venv/bin/ray"
else
  ray_bin="$(command -v ray)" || { echo "ray not found: run 'make install' or set RAY_BIN" >&2; exit 1; }
fi
python_bin="$(dirname "$ray_bin")/python"
[[ -x "$python_bin" ]] || python_bin="$(command -v python3)"

# Prints the port if it is free on 127.0.0.1, else a free one picked by the OS.
free_port() {
  "$python_bin" - "$1" <<'PY'
import socket, sys
want = int(sys.argv[1])
s = socket.socket()
try:
    s.bind(("127.0.0.1", want))
except OSError:
    s.close()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

port="$(free_port "${RAY_PORT:-6379}")"
dashboard_port="$(free_port "${RAY_DASHBOARD_PORT:-8265}")"
# A temp dir of its own (short: Ray puts Unix sockets in it), so stop-head.sh can find exactly this head's
# processes and leave any other Ray on the machine alone.
temp_dir="${RAY_TEMP_DIR:-/tmp/latte-ray-head-$port}"
state_dir="${LATTE_RAY_LOCAL_STATE:-$REPO_ROOT/.cache/infra-local}"
mkdir -p "$state_dir"

export RAY_AUTH_MODE=disabled
# On Linux Ray replaces --node-ip-address 127.0.0.1 with the host's own IP; single-node mode keeps every
# Ray service on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
args=(start --head
  --node-ip-address 127.0.0.1
  --port "$port"
  --dashboard-host 127.0.0.1
  --dashboard-port "$dashboard_port"
  --include-dashboard=true
  --temp-dir "$temp_dir"
  --disable-usage-stats)
if [[ -n "${RAY_NUM_CPUS:-}" ]]; then
  args+=(--num-cpus "$RAY_NUM_CPUS")
fi

"$ray_bin" "${args[@]}"
printf 'RAY_HEAD_TEMP_DIR=%q\n' "$temp_dir" > "$state_dir/head.env"

cat <<EOF

Ray head is up: GCS 127.0.0.1:$port, dashboard http://127.0.0.1:$dashboard_port
Submit from the repo root:
  export RAY_AUTH_MODE=disabled
  export RAY_ADDRESS=http://127.0.0.1:$dashboard_port
  ray job submit --address http://127.0.0.1:$dashboard_port --working-dir . --runtime-env jobs/runtime_env.yaml \\
    -- python jobs/generate.py --pipeline pipelines/tiny-cpu.yaml --prompts PROMPTS_URL --output OUTPUT_URL
Stop it with: infra/local/stop-head.sh
EOF
