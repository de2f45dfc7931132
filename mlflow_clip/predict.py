"""`mlflow-clip predict`: score or embed many images with a model, into a table.

Images in: a folder (every file under it, recursively, in name order), a CSV with a column of
paths (relative to the CSV's folder), or a Parquet table with a column of image bytes or of
paths. A table out (Parquet, or CSV or JSON lines by the output's suffix): one row per image, in
input order, keyed by `path` (or `row`, the row number, for image bytes), with the model's
answer: `label`, `score`, `probabilities` (and `top_labels`, `top_scores` with `top_k`),
`label` and `score` alone, or `embedding`; and `error`, null for a good row, the reason for a
file that could not be read or decoded (the run goes on).

The model is resolved once, downloaded and checked (`download.py`) and run by the installed
library, in batches, on the caller's thread while the next batch's files are read by another.
Each finished batch is written at once, atomically, into `<output>.parts/`; a run stopped at any
moment resumes there with the same arguments (finished batches are not scored again), and the
output itself is written atomically once every batch is done. An existing output is replaced
only when asked (`overwrite`), by the same rows: re-running is idempotent.

    >>> result = predict_images("models:/clip-zero-shot/1", "photos/", "scores.parquet")  # doctest: +SKIP
    >>> result.rows, result.failed, result.images_per_second  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from mlflow_clip.errors import PredictError

MODES = ("full", "label", "embedding")
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
DEFAULT_BATCH_SIZE = 64
STATE_FILE = "state.json"
# A batch job is one caller with its own files: the per-request pixel budget meant for untrusted
# HTTP requests is lifted, every per-image limit still holds (as on Spark).
BATCH_MODEL_CONFIG = {"max_request_pixels": 10**15}

__all__ = ["PredictError", "PredictResult", "PredictOptions", "predict_images"]


@dataclass(frozen=True)
class PredictOptions:
    mode: str = "full"
    top_k: int = 0
    classes: tuple[str, ...] = ()
    templates: str = ""
    batch_size: int = DEFAULT_BATCH_SIZE
    column: str = ""  # the input table's column (default: image, else path)


@dataclass
class PredictResult:
    output: Path
    rows: int
    failed: int
    scored_now: int  # rows scored by this run (the others were resumed)
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.scored_now / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Source:
    key_name: str  # "path" or "row"
    keys: list[Any]
    fingerprint: str
    # batches(size, max_bytes, skip): each batch's rows as bytes or an error text, None for a skipped batch
    batches: Callable[[int, int, set[int]], Iterator[list[Any] | None]]


def predict_images(
    model_uri: str,
    source: str | os.PathLike,
    output: str | os.PathLike,
    options: PredictOptions = PredictOptions(),
    overwrite: bool = False,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> PredictResult:
    """Score (or embed) every image of `source` with the model at `model_uri` into `output`.
    `progress(done, total, failed, images_per_second)` is called after each batch."""
    from mlflow_clip.download import download_verified
    from mlflow_clip.serving.loader import load_classifier

    _check_options(options)
    output = Path(output)
    out_format = _output_format(output)
    if output.exists() and not overwrite:
        raise PredictError(f"{output} exists. Pass --overwrite to replace it (with the same rows, for the same input).")
    images = open_source(Path(source), options.column)
    model = download_verified(model_uri)
    try:
        classifier = load_classifier(model.path, BATCH_MODEL_CONFIG, model.pinned)
        parts = output.with_name(output.name + ".parts")
        done = _resume(parts, _state(model, images, options))
        started = time.perf_counter()
        scored = _run_batches(classifier, images, options, parts, done, progress)
        seconds = time.perf_counter() - started
        table = _gather(parts, -(-len(images.keys) // options.batch_size), images.key_name)
        _write_atomically(table, output, out_format)
        shutil.rmtree(parts, ignore_errors=True)
        classifier.close()
    finally:
        model.cleanup()
    return PredictResult(output, len(table), int(table["error"].notna().sum()), scored, seconds)


def _run_batches(classifier, images: _Source, options: PredictOptions, parts: Path, done: set[int], progress) -> int:
    """Score every batch not in `done`, writing each as a part; the next batch's files are read
    by another thread meanwhile. Returns the rows scored."""
    total, size = len(images.keys), options.batch_size
    batches = images.batches(size, _max_bytes(), done)
    scored, failed, started = 0, 0, time.perf_counter()
    resumed = sum(min(size, total - i * size) for i in done)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-clip-read") as reader:
        upcoming = reader.submit(next, batches, _END)
        for index in itertools.count():
            values = upcoming.result()
            if values is _END:
                break
            upcoming = reader.submit(next, batches, _END)
            if values is None:  # finished by an earlier run
                continue
            table = _score(classifier, images, index * size, values, options)
            _write_atomically(table, parts / f"part-{index:06d}.parquet", "parquet")
            scored += len(values)
            failed += int(table["error"].notna().sum())
            if progress is not None:
                rate = scored / max(time.perf_counter() - started, 1e-9)
                progress(resumed + scored, total, failed, rate)
    return scored


_END = object()


def _state(model: Any, images: _Source, options: PredictOptions) -> dict[str, Any]:
    """What a resumed run must share with the run it resumes."""
    from mlflow_clip.serving.manifest import manifest_digest, read_mlmodel, recorded_manifest

    manifest = recorded_manifest(read_mlmodel(model.path))
    return {
        "model": model.source,
        "model_manifest": manifest_digest(manifest) if manifest else "",
        "input": images.fingerprint,
        "options": asdict(options),
    }


def _check_options(options: PredictOptions) -> None:
    if options.mode not in MODES:
        raise PredictError(f"Received mode={options.mode!r}; expected one of {list(MODES)}.")
    if options.batch_size < 1:
        raise PredictError(f"Received batch_size={options.batch_size}; expected at least 1 image per batch.")
    if options.top_k < 0:
        raise PredictError(f"Received top_k={options.top_k}; expected a whole number, 0 for off.")
    if options.mode == "embedding" and (options.top_k or options.classes):
        raise PredictError("Embeddings take no top_k or classes: leave them out, or choose mode full or label.")


def _output_format(output: Path) -> str:
    kind = FORMATS.get(output.suffix.lower())
    if kind is None:
        raise PredictError(
            f"Received output {output.name}; expected a file ending in one of {sorted(FORMATS)} (Parquet, CSV or "
            "JSON lines)."
        )
    return kind


def _max_bytes() -> int:
    from mlflow_clip.serving.limits import InputLimits

    return InputLimits().max_bytes


# -- input ---------------------------------------------------------------------------------------


def open_source(source: Path, column: str = "") -> _Source:
    """The images of a folder, a CSV of paths, or a Parquet table of bytes or paths."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        return _path_source([str(p.relative_to(source)) for p in files], source)
    if not source.is_file():
        raise PredictError(
            f"No folder or file at {source}. Give a folder of images, a CSV of paths or a Parquet table."
        )
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return _csv_source(source, column)
    if suffix in (".parquet", ".pq"):
        return _parquet_source(source, column)
    raise PredictError(f"Received {source.name}; expected a folder, a .csv file of paths or a .parquet table.")


def _path_source(paths: list[str], base: Path) -> _Source:
    def batches(size: int, max_bytes: int, skip: set[int]) -> Iterator[list[Any] | None]:
        for index, start in enumerate(range(0, len(paths), size)):
            yield None if index in skip else [_read_file(base / p, max_bytes) for p in paths[start : start + size]]

    stats = []
    for path in paths:
        try:
            stat = (base / path).stat()
            stats.append(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}")
        except OSError:
            stats.append(f"{path}\0missing")
    return _Source("path", paths, hashlib.sha256("\n".join(stats).encode()).hexdigest(), batches)


def _read_file(path: Path, max_bytes: int) -> Any:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return f"{size} bytes > limit {max_bytes} (max_bytes); not read"
        return path.read_bytes()
    except OSError as e:
        return f"cannot read the file: {e.strerror or e}"


def _csv_source(source: Path, column: str) -> _Source:
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    name = column or "path"
    if name not in frame.columns:
        raise PredictError(
            f"{source.name} has columns {list(frame.columns)[:8]}; expected a column {name!r} of image paths "
            "(or name it with --column)."
        )
    return _path_source(list(frame[name]), source.parent)


def _parquet_source(source: Path, column: str) -> _Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(source)
    name = column or ("image" if "image" in schema.names else "path")
    if name not in schema.names:
        raise PredictError(
            f"{source.name} has columns {schema.names[:8]}; expected a column 'image' of image bytes or 'path' of "
            "image paths (or name it with --column)."
        )
    kind = schema.field(name).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        paths = pq.read_table(source, columns=[name]).column(name).to_pylist()
        return _path_source([p if p is not None else "" for p in paths], source.parent)
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise PredictError(f"Column {name!r} of {source.name} is {kind}; expected image bytes (binary) or paths.")
    stat = source.stat()
    rows = pq.ParquetFile(source).metadata.num_rows
    fingerprint = f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{name}"

    def batches(size: int, max_bytes: int, skip: set[int]) -> Iterator[list[Any] | None]:
        for index, batch in enumerate(pq.ParquetFile(source).iter_batches(batch_size=size, columns=[name])):
            if index in skip:
                yield None
                continue
            values = batch.column(0).to_pylist()
            yield [_checked_cell(v, max_bytes) for v in values]

    return _Source("row", list(range(rows)), hashlib.sha256(fingerprint.encode()).hexdigest(), batches)


def _checked_cell(value: Any, max_bytes: int) -> Any:
    if value is None:
        return "missing (null), not an image"
    return value if len(value) <= max_bytes else f"{len(value)} bytes > limit {max_bytes} (max_bytes)"


# -- scoring and output --------------------------------------------------------------------------


def _score(classifier: Any, images: _Source, start: int, values: list[Any], options: PredictOptions) -> pd.DataFrame:
    """The batch's rows: key, the model's columns for the mode, error (a read error wins)."""
    unread = {i: v for i, v in enumerate(values) if isinstance(v, str)}
    rows = [b"" if isinstance(v, str) else v for v in values]
    if options.mode == "embedding":
        out = classifier.embed_images(rows, on_error="null")
    else:
        out = classifier.predict(
            rows,
            top_k=options.top_k,
            on_error="null",
            classes=list(options.classes) or None,
            templates=options.templates or None,
        )
        if options.mode == "label":
            out = out[["label", "score", "error"]]
    out = out.copy()
    for i, reason in unread.items():
        out.loc[i, [c for c in out.columns if c != "error"]] = None
        out.loc[i, "error"] = reason
    out.insert(0, images.key_name, images.keys[start : start + len(values)])
    return out


def _resume(parts: Path, state: dict[str, Any]) -> set[int]:
    """The batches a previous run with the same model, input and options finished; a run with
    others left behind is refused, naming what differs."""
    state_path = parts / STATE_FILE
    if parts.is_dir() and state_path.is_file():
        previous = json.loads(state_path.read_text())
        if previous != json.loads(json.dumps(state)):
            differs = sorted(k for k in state if previous.get(k) != json.loads(json.dumps(state[k])))
            raise PredictError(
                f"{parts} holds an unfinished run with another {', '.join(differs)}. Re-run with the same "
                f"arguments to resume it, or remove {parts} to start over."
            )
        return {int(p.stem.split("-")[1]) for p in parts.glob("part-*.parquet")}
    parts.mkdir(parents=True, exist_ok=True)
    _write_text_atomically(state_path, json.dumps(state, indent=2))
    return set()


def _gather(parts: Path, batches: int, key_name: str) -> pd.DataFrame:
    frames = [pd.read_parquet(parts / f"part-{i:06d}.parquet") for i in range(batches)]
    if not frames:
        return pd.DataFrame({key_name: [], "error": []})
    return pd.concat(frames, ignore_index=True)


def _write_atomically(table: pd.DataFrame, path: Path, kind: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if kind == "parquet":
        table.to_parquet(temporary, index=False)
    elif kind == "csv":
        _listless(table).to_csv(temporary, index=False)
    else:
        table.to_json(temporary, orient="records", lines=True, force_ascii=False)
    os.replace(temporary, path)


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _listless(table: pd.DataFrame) -> pd.DataFrame:
    """List columns as JSON text, for CSV."""
    out = table.copy()
    for name in out.columns:
        if out[name].map(_is_list).any():
            out[name] = [json.dumps([_plain(x) for x in v]) if _is_list(v) else None for v in out[name]]
    return out


def _is_list(value: Any) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, (str, bytes))


def _plain(value: Any) -> Any:
    return value if isinstance(value, str) else float(value)


def print_progress(done: int, total: int, failed: int, rate: float) -> None:
    """One progress line on stderr, rewritten in place on a terminal."""
    share = done / total if total else 1.0
    eta = (total - done) / rate if rate > 0 else 0.0
    line = (
        f"[mlflow-clip] {done:,}/{total:,} images ({share:.0%}), {rate:.1f} images/s, {failed:,} failed, "
        f"{eta:.0f} s left"
    )
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + ("\n" if done >= total else ""))
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
