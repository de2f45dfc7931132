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

    params = {"top_k": args.top_k, "on_error": args.on_error}
    try:
        predictions = predict_files(args.url, args.paths, params)
    except urllib.error.HTTPError as e:  # MLflow answers bad requests with a JSON error
        print(f"HTTP {e.code}: {e.read().decode('utf-8', 'replace')}", file=sys.stderr)
        return 1
    for path, prediction in zip(args.paths, predictions):
        print(json.dumps({"path": path, **prediction}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
