"""What the export can know before torch loads: the weights are there, the runtime is installed.

Torch-free, so that a newcomer's mistake costs a second, not the minute of importing torch and
loading CLIP that used to come before it (`ExportSpec.create` calls these):

- an OpenAI checkpoint path must be a readable, non-empty file (a relative path is looked up
  as `@file` arguments are, in `$PWD` first; `mlflow run` starts the job in the project's folder
  through `bash -c`, which resets `$PWD` there, so its users are told to give an absolute path);
- an OpenAI model name must be in the download cache (`~/.cache/clip`, or
  `$MLFLOW_CLIP_CACHE_DIR`), or the machine must reach the host clip downloads it from: one TCP
  connection, through the HTTPS proxy when one is set, answered within `ONLINE_TIMEOUT_SECONDS`;
- a precision whose runtime is not onnxruntime needs that runtime installed (bf16: OpenVINO),
  and bf16 needs a CPU where OpenVINO computes in bf16 (AVX-512): elsewhere it runs the graph in
  f32, and the bf16 gates would measure fp32.

    >>> check_openai_weights("demo")
    'demo'
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow_clip.errors import WeightsError
from mlflow_clip.export.options import SpecError
from mlflow_clip.prompt_files import locate
from mlflow_clip.serving.openvino_runtime import openvino_available, openvino_runs_bf16

DEMO_MODEL_NAME = "demo"
CACHE_ENV = "MLFLOW_CLIP_CACHE_DIR"
# openai-clip 1.0.1's `clip.clip._MODELS`: each name and the file it downloads, from this host
# (tests/export/test_preflight.py checks both against the installed clip).
OPENAI_DOWNLOAD_HOST = "openaipublic.azureedge.net"
OPENAI_MODEL_FILES: dict[str, str] = {
    "RN50": "RN50.pt",
    "RN101": "RN101.pt",
    "RN50x4": "RN50x4.pt",
    "RN50x16": "RN50x16.pt",
    "RN50x64": "RN50x64.pt",
    "ViT-B/32": "ViT-B-32.pt",
    "ViT-B/16": "ViT-B-16.pt",
    "ViT-L/14": "ViT-L-14.pt",
    "ViT-L/14@336px": "ViT-L-14-336px.pt",
}
ONLINE_TIMEOUT_SECONDS = 1.0
RUNTIME_INSTALLS = {"bf16": ("OpenVINO", openvino_available, 'pip install "mlflow-clip[openvino]"')}


def default_cache_dir() -> Path:
    """Where OpenAI's checkpoints are downloaded to, and looked for: `$MLFLOW_CLIP_CACHE_DIR`, or
    clip's own `~/.cache/clip`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clip")


def check_openai_weights(model: str) -> str:
    """`model` if its weights can be had (for a relative path found in the caller's directory,
    that path); raises `WeightsError` in one line naming the fix."""
    if model == DEMO_MODEL_NAME:
        return model
    if model in OPENAI_MODEL_FILES:
        _check_named(model)
        return model
    path, searched = locate(model)
    problem = _unreadable(path)
    if problem:
        raise WeightsError(
            f"Received model={model!r}; {problem}. Expected {_names()}, '{DEMO_MODEL_NAME}', open_clip:<architecture>, "
            f"hf:<folder>, or a local OpenAI checkpoint file" + _searched(model, searched) + "."
        )
    return model if path == Path.cwd() / model or Path(model).is_absolute() else str(path)


def check_runtime(precision: str) -> None:
    """Refuse a precision whose runtime is not installed here (the export measures parity on it)."""
    if precision in RUNTIME_INSTALLS:
        runtime, available, install = RUNTIME_INSTALLS[precision]
        if not available():
            raise SpecError(
                f"Received precision={precision!r}, which runs on {runtime}, and {runtime} is not installed here: "
                f"{install}, or choose fp32 or int8."
            )
    if precision == "bf16" and not openvino_runs_bf16():
        raise SpecError(
            "Received precision='bf16', and OpenVINO has no bf16 on this CPU (it needs AVX-512: AVX512_BF16 or AMX "
            "to be fast): it would run the graph in fp32, so the bf16 gates would measure fp32. Export bf16 on such a "
            "CPU, or choose fp32 or int8 (precision=auto leaves bf16 out here)."
        )


def is_online(host: str = OPENAI_DOWNLOAD_HOST, timeout: float = ONLINE_TIMEOUT_SECONDS) -> bool:
    """Whether a TCP connection to `host`:443 (or to the HTTPS proxy, when one is set) opens
    within `timeout` seconds, name lookup included."""
    proxy = urllib.request.getproxies().get("https")
    target = (host, 443)
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        target = (parsed.hostname or "", parsed.port or 3128)
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(target, timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)  # a stuck name lookup ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _check_named(name: str) -> None:
    cached = default_cache_dir() / OPENAI_MODEL_FILES[name]
    if not _unreadable(cached):
        return
    if is_online():
        return
    raise WeightsError(
        f"Received model={name!r}, which is not in the cache ({cached}), and this machine cannot reach "
        f"{OPENAI_DOWNLOAD_HOST} to download it. Copy {cached.name} there (or set ${CACHE_ENV} to its folder), or "
        f"pass a local checkpoint: model=/path/to/{cached.name}."
    )


def _unreadable(path: Path) -> str:
    """Why `path` cannot serve as a checkpoint file, or ''."""
    try:
        with open(path, "rb") as file:
            if not file.read(1):
                return f"{path} is empty"
    except FileNotFoundError:
        return f"no file exists at {path}"
    except IsADirectoryError:
        return f"{path} is a folder, not a checkpoint file (a Hugging Face folder is passed as hf:<folder>)"
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or type(e).__name__})"
    return ""


def _names() -> str:
    return "an OpenAI CLIP name (" + ", ".join(OPENAI_MODEL_FILES) + ")"


def _searched(model: str, searched: list[Path]) -> str:
    if Path(model).expanduser().is_absolute():
        return ""
    where = f" (looked for {model} in {' and '.join(str(folder) for folder in searched)}"
    if os.environ.get("MLFLOW_RUN_ID"):
        return where + "; mlflow run starts the job in the project's folder: give the checkpoint's absolute path)"
    return where + ")"
