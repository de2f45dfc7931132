#!/usr/bin/env bash
# Serve a registered mlflow-clip model locally and ask it about one image.
#
#   bash examples/serve_and_query.sh demo-images
#   MODEL_URI=models:/clip-zero-shot/1 PORT=5002 TOP_K=3 bash examples/serve_and_query.sh demo-images
#
# MODEL_URI defaults to models:/clip-zero-shot/latest, from the store in MLFLOW_TRACKING_URI
# (MLflow's default: sqlite:///mlflow.db in the working directory). Posts the first image of the
# folder (sorted by path; its path goes to stderr) in the dataframe_split form with params
# top_k, prints the server's JSON answer, and stops the server on exit.
set -euo pipefail

IMAGE_DIR="${1:?usage: serve_and_query.sh IMAGE_FOLDER}"
MODEL_URI="${MODEL_URI:-models:/clip-zero-shot/latest}"
PORT="${PORT:-5001}"
TOP_K="${TOP_K:-3}"
WAIT_SECONDS="${WAIT_SECONDS:-120}"
URL="http://127.0.0.1:$PORT"

IMAGE="$(find "$IMAGE_DIR" -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.webp' \
  -o -iname '*.bmp' \) | LC_ALL=C sort | head -n 1)"
[ -n "$IMAGE" ] || { echo "No image files under $IMAGE_DIR" >&2; exit 1; }
echo "Image: $IMAGE" >&2

LOG="$(mktemp)"
BODY="$(mktemp)"
mlflow models serve -m "$MODEL_URI" --env-manager local -h 127.0.0.1 -p "$PORT" >"$LOG" 2>&1 &
SERVER_PID=$!
stop_server() {  # MLflow starts uvicorn so that it gets SIGTERM when this server process dies
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  for ((i = 0; i < 20; i++)); do curl -sf "$URL/ping" >/dev/null || break; sleep 0.5; done
  rm -f "$LOG" "$BODY"
}
trap stop_server EXIT

for ((i = 0; i < WAIT_SECONDS; i++)); do
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "The server exited:" >&2; cat "$LOG" >&2; exit 1; }
  curl -sf "$URL/ping" >/dev/null && break
  sleep 1
done
curl -sf "$URL/ping" >/dev/null || { echo "No answer on $URL/ping after ${WAIT_SECONDS}s:" >&2; cat "$LOG" >&2; exit 1; }

{
  printf '{"dataframe_split": {"columns": ["image"], "data": [["'
  base64 -w0 "$IMAGE"
  printf '"]]}, "params": {"top_k": %d}}' "$TOP_K"
} >"$BODY"
curl -sS --fail-with-body -H 'Content-Type: application/json' --data-binary @"$BODY" "$URL/invocations"
echo
