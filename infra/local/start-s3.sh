#!/usr/bin/env bash
# Start moto's standalone S3 server in the background as a local stand-in for AWS S3.
#
#   eval "$(infra/local/start-s3.sh)"     # starts it and exports the env in this shell
#   infra/local/start-s3.sh               # or: start it, then `source .cache/infra-local/s3.env`
#
# stdout carries only `export ...` lines (so `eval` works); progress goes to stderr.
# Settings: S3_HOST (127.0.0.1), S3_PORT (5555), S3_BUCKET (latte-ray), MOTO_SERVER (path to moto_server).
# Data lives in the server's memory and is gone after stop-s3.sh.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_DIR="${LATTE_RAY_LOCAL_STATE:-$REPO_ROOT/.cache/infra-local}"   # /.cache/ is git-ignored
PID_FILE="$STATE_DIR/moto.pid"
LOG_FILE="$STATE_DIR/moto.log"
ENV_FILE="$STATE_DIR/s3.env"
HOST="${S3_HOST:-127.0.0.1}"
PORT="${S3_PORT:-5555}"
BUCKET="${S3_BUCKET:-latte-ray}"
ENDPOINT="http://$HOST:$PORT"

# moto 5 installs the server as `moto_server` (from moto[server]); `python -m moto.server` is the same.
if [[ -n "${MOTO_SERVER:-}" ]]; then
  moto=("$MOTO_SERVER")
elif [[ -x "$REPO_ROOT/.venv/bin/moto_server" ]]; then
  moto=("$REPO_ROOT/.venv/bin/moto_server")
elif command -v moto_server >/dev/null 2>&1; then
  moto=("$(command -v moto_server)")
else
  moto=(python3 -m moto.server)
fi
if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
  python_bin="$REPO_ROOT/.venv/bin/python"
else
  python_bin="$(command -v python3)"
fi

mkdir -p "$STATE_DIR"
if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  echo "moto S3 server already running (pid $(cat "$PID_FILE")) on $ENDPOINT" >&2
else
  nohup "${moto[@]}" -H "$HOST" -p "$PORT" >"$LOG_FILE" 2>&1 &
  echo $! >"$PID_FILE"
  echo "started moto S3 server (pid $(cat "$PID_FILE")) on $ENDPOINT, log $LOG_FILE" >&2
fi

# Dummy credentials: moto accepts any; never real keys here.
cat >"$ENV_FILE" <<ENV
export AWS_ENDPOINT_URL=$ENDPOINT
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
ENV

# Wait until it answers, then create the bucket (idempotent).
AWS_ENDPOINT_URL="$ENDPOINT" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
AWS_DEFAULT_REGION=us-east-1 "$python_bin" - "$ENDPOINT" "$BUCKET" <<'PY' >&2 || {
import sys, time, urllib.request
endpoint, bucket = sys.argv[1], sys.argv[2]
for _ in range(100):
    try:
        urllib.request.urlopen(endpoint, timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(f"moto S3 server did not answer on {endpoint}")
try:
    import boto3
except ImportError:
    print(f"boto3 not installed; create the bucket with: aws --endpoint-url {endpoint} s3 mb s3://{bucket}")
    sys.exit(0)
s3 = boto3.client("s3", endpoint_url=endpoint)
if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
    s3.create_bucket(Bucket=bucket)
print(f"bucket s3://{bucket} ready")
PY
  echo "see $LOG_FILE" >&2
  exit 1
}
if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  echo "moto S3 server exited (port $PORT in use?); see $LOG_FILE" >&2
  rm -f "$PID_FILE"
  exit 1
fi

cat "$ENV_FILE"
cat >&2 <<EOF
Use it from this shell (and start the Ray head after this, so its workers inherit the endpoint):
  source $ENV_FILE
  aws s3 cp examples/prompts.parquet s3://$BUCKET/prompts/prompts.parquet
Stop it with: infra/local/stop-s3.sh
EOF
