"""Classify image files with an mlflow-clip model served by `mlflow models serve`.

    mlflow models serve -m models:/clip-zero-shot/1 --env-manager local -p 5001 &
    python examples/query_server.py http://127.0.0.1:5001 "demo-images/a red circle/0001.png" --top-k 3

Prints one JSON line per image: its path and the model's answer (label, score, probabilities,
error, and with --top-k the top_labels and top_scores). The server never opens paths: this
client reads each file and sends its bytes, base64-encoded (mlflow_clip.client.predict_files).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
from pathlib import Path

from mlflow_clip.client import predict_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:5001")
    parser.add_argument("paths", nargs="+", help="image files")
    parser.add_argument("--top-k", type=int, default=0, help="also return the k best labels")
    parser.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "null"],
        help="null: unreadable files get a null label and an error text",
    )
    args = parser.parse_args(argv)

    problem = next((_unreadable(path) for path in args.paths if _unreadable(path)), "")
    if problem:
        return _fail(problem)
    params = {"top_k": args.top_k, "on_error": args.on_error}
    try:
        predictions = predict_files(args.url, args.paths, params)
    except urllib.error.HTTPError as e:  # MLflow answers bad requests with a JSON error
        return _fail(f"HTTP {e.code} {_server_message(e.read())}")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        return _fail(
            f"no answer from {args.url} ({reason}). Is the server running? It takes 10 to 20 s to start: "
            f"curl -sf {args.url.rstrip('/')}/ping says when it is up."
        )
    for path, prediction in zip(args.paths, predictions):
        print(json.dumps({"path": path, **prediction}))
    return 0


def _unreadable(path: str) -> str:
    if not Path(path).is_file():
        return f"no image file at {path}" + (" (it is a folder)" if Path(path).is_dir() else "")
    try:
        Path(path).open("rb").close()
    except OSError as e:
        return f"cannot read {path} ({e.strerror})"
    return ""


def _server_message(body: bytes) -> str:
    """`ERROR_CODE: message` from MLflow's JSON error, on one line."""
    try:
        error = json.loads(body)
        return f"{error.get('error_code', '')}: {' '.join(str(error.get('message', '')).split())}"
    except ValueError:
        return " ".join(body.decode("utf-8", "replace").split())[:500]


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
