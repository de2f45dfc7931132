"""The in-process rows, each set up in its own child: (a) torch, (a+) the strongest torch,
(b) onnxruntime, and the pyfunc rows ((c), (e), draft, settings). Each task loads, warms up and
returns an `InProcessRow` whose rounds the parent asks for."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.images import read_pool, request_images
from benchmarks.measure import InProcessRow
from benchmarks.models import flavor_conf


def task_torch(spec: dict[str, Any]) -> InProcessRow:
    """Row (a): what a CLIP user runs, as CLIP's README does it: the model `clip.load` builds
    from a local file (`clip.model.build_model`, float32), CLIP's own `preprocess` on each PIL
    image, `encode_image`, L2 normalization and the logit scale times the cosine to the class
    features, then softmax. The class features and scale are the exported head's."""
    import torch
    from PIL import Image

    from mlflow_clip.export.checkpoints import load_clip

    torch.set_num_threads(spec["threads"])
    loaded = load_clip(spec["clip_spec"])
    model, preprocess = loaded.model, loaded.preprocess
    head = np.load(spec["head"])
    text, scale = torch.from_numpy(head["text_features"]).float(), float(head["logit_scale"])
    pool = read_pool(spec)

    def call(index: int, _state: Any) -> np.ndarray:
        images = [preprocess(Image.open(io.BytesIO(data))) for data in request_images(pool, spec["batch"], index)]
        with torch.inference_mode():
            return zero_shot_probabilities(model.encode_image(torch.stack(images)), text, scale)

    return InProcessRow(call, spec, {"engine": torch_engine()})


STRONG_TORCH_LABEL = "(a+) strongest torch"
# torch.compile is kept only when it is at least this much faster than eager on the same batch.
COMPILE_MIN_GAIN = 0.03


def strong_torch_bf16() -> bool:
    """Whether the strongest torch here computes the image tower under bf16 autocast: where the
    CPU has native bf16 (AVX512_BF16 or AMX), as for the bf16 precision. Elsewhere torch emulates
    bf16 at a fraction of fp32's speed (RN50's pipeline at 0.17x CLIP's fp32 one on an AVX2-only
    CPU), and a user keeps fp32."""
    from mlflow_clip.serving.variants import cpu_flags, native_flags

    return bool(native_flags("bf16", cpu_flags()))


def strong_torch_label(bf16: bool, compiled: bool = False) -> str:
    """Row (a+)'s label: what ran."""
    how = "bf16 autocast, channels_last" if bf16 else "fp32, channels_last (no native bf16 here)"
    return f"{STRONG_TORCH_LABEL}: {how}" + (", torch.compile" if compiled else "")


def task_torch_strong(spec: dict[str, Any]) -> InProcessRow:
    """Row (a+): the strongest torch a CLIP user on this CPU would run: row (a)'s model, weights,
    `preprocess` and head, with the weights and batches in `channels_last`, the image tower under
    bf16 autocast where the CPU has native bf16 (`strong_torch_bf16`), and `torch.compile` where
    it compiles and is faster on a warm batch (`spec["torch_compile"]`). The label and note say
    exactly what ran."""
    import torch
    from PIL import Image

    from mlflow_clip.export.checkpoints import load_clip

    torch.set_num_threads(spec["threads"])
    loaded = load_clip(spec["clip_spec"])
    model, preprocess = loaded.model.eval().to(memory_format=torch.channels_last), loaded.preprocess
    head = np.load(spec["head"])
    text, scale = torch.from_numpy(head["text_features"]).float(), float(head["logit_scale"])
    pool = read_pool(spec)
    bf16 = strong_torch_bf16()

    def pixels(index: int):
        images = [preprocess(Image.open(io.BytesIO(data))) for data in request_images(pool, spec["batch"], index)]
        return torch.stack(images).to(model.dtype).contiguous(memory_format=torch.channels_last)

    visual, how = fastest_visual(model.visual, pixels(0), spec.get("torch_compile", True), bf16)

    def call(index: int, _state: Any) -> np.ndarray:
        batch = pixels(index)
        with torch.inference_mode(), _autocast(bf16):
            features = visual(batch)
        return zero_shot_probabilities(features.float(), text, scale)

    label = strong_torch_label(bf16, compiled=visual is not model.visual)
    return InProcessRow(call, spec, {"engine": f"{torch_engine()}; {how}", "label": label})


def _autocast(bf16: bool) -> Any:
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def fastest_visual(visual: Any, sample: Any, try_compile: bool, bf16: bool = True, rounds: int = 3) -> tuple[Any, str]:
    """`visual` or `torch.compile(visual)`, whichever ran `sample` faster (under bf16 autocast
    when `bf16`; the best of `rounds` alternating timings, after each has run once), and what was
    chosen, why."""
    import torch

    if not try_compile:
        return visual, "eager (torch.compile not tried: --no-torch-compile)"

    def seconds(fn: Any) -> float:
        with torch.inference_mode(), _autocast(bf16):
            began = time.perf_counter()
            fn(sample)
            return time.perf_counter() - began

    began = time.perf_counter()
    try:
        compiled = torch.compile(visual)
        seconds(compiled)  # compiles
    except Exception as e:  # a backend that cannot build here (no compiler, an unsupported op)
        return visual, f"eager (torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]})"
    compile_s = time.perf_counter() - began
    seconds(visual)
    eager_s, compiled_s = float("inf"), float("inf")
    for _ in range(rounds):
        eager_s, compiled_s = min(eager_s, seconds(visual)), min(compiled_s, seconds(compiled))
    timings = f"{compiled_s * 1000:.0f} ms vs eager {eager_s * 1000:.0f} ms per batch; compiling took {compile_s:.0f} s"
    if compiled_s < eager_s * (1 - COMPILE_MIN_GAIN):
        return compiled, f"torch.compile (inductor): {timings}"
    return visual, f"eager: torch.compile ran and was not faster ({timings})"


def zero_shot_probabilities(image_features, text_features, logit_scale) -> np.ndarray:
    """CLIP's README scoring on torch tensors: normalize the image features, scale the cosine to
    the (normalized) class features [C, D], softmax over the classes."""
    features = image_features / image_features.norm(dim=-1, keepdim=True)
    return (logit_scale * features @ text_features.t()).softmax(dim=-1).numpy()


def torch_engine() -> str:
    """What runs a torch row, for its note: torch's version with its build tag, and its threads."""
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def task_onnxruntime(spec: dict[str, Any]) -> InProcessRow:
    """Row (b): the graph alone on float32 tensors preprocessed beforehand (exactly), with the
    pyfunc's session settings and the model's own runtime (OpenVINO for bf16 and, where chosen,
    static int8)."""
    from mlflow_clip.serving.contract import ClassifierConfig
    from mlflow_clip.serving.images import decode_image
    from mlflow_clip.serving.preprocess import Preprocessor
    from mlflow_clip.serving.runtime import RuntimeSettings, open_session

    model_dir = Path(spec["model_dir"])
    settings = RuntimeSettings.from_dict(flavor_conf(model_dir).get("runtime")).with_overrides(spec["model_config"])
    config = ClassifierConfig.read(model_dir)
    session = open_session(model_dir / "model.onnx", settings, config.precision)
    preprocessor = Preprocessor.from_config(config)
    encoded = read_pool(spec)
    tensors = [preprocessor(decode_image(data)) for data in encoded]

    def decode_timings() -> dict[str, float]:
        """The work row (c) adds per image, in CPU ms of this thread (what the decode-bound
        ceiling counts), exact and, for the model's default decode of int8 and bf16, draft."""
        timings = {"decode_ms": _thread_ms_per_item(encoded, lambda data: preprocessor(decode_image(data)))}
        if settings.jpeg_draft:
            draft = config.input_resolution
            timings["draft_decode_ms"] = _thread_ms_per_item(
                encoded, lambda data: preprocessor(decode_image(data, draft_size=draft))
            )
        return timings

    measured = decode_timings()  # at set-up too, for a run with no rounds
    probabilities = session.output_names[:1]  # what the pyfunc asks for
    batches: dict[int, np.ndarray] = {}

    def call(index: int, _state: Any) -> np.ndarray:
        offset = (index * spec["batch"]) % len(tensors)
        if offset not in batches:
            batches[offset] = np.ascontiguousarray(np.stack(request_images(tensors, spec["batch"], index)))
        return session.run(batches[offset], probabilities)[0]

    for index in range(len(tensors)):  # every distinct batch is built before timing
        call(index, None)
    return InProcessRow(call, spec, measured, per_round=decode_timings)


def _thread_ms_per_item(items: list[Any], work: Callable[[Any], Any]) -> float:
    """This thread's CPU milliseconds per item of `work` over `items` (one pass)."""
    began = time.thread_time()
    for item in items:
        work(item)
    return (time.thread_time() - began) * 1000.0 / len(items)


def task_pyfunc(spec: dict[str, Any]) -> InProcessRow:
    """Rows (c), (e) and draft: the pyfunc end to end from encoded bytes."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(spec["model_dir"], model_config=spec["model_config"])
    pool = read_pool(spec)

    def call(index: int, _state: Any) -> np.ndarray:
        frame = pd.DataFrame({"image": request_images(pool, spec["batch"], index)})
        return np.stack(model.predict(frame, params=spec.get("params"))["probabilities"].to_numpy())

    return InProcessRow(call, spec)
