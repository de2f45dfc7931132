"""The binding to the native resize + crop + normalize (`_mlflow_clip_resample`).

The extension computes only the pixels CLIP's center crop keeps, with Pillow's own fixed-point
arithmetic, so its output is bit-for-bit the output of ``Image.resize`` + ``Image.crop`` +
the normalization table. That equality is not taken on trust: ``preprocess.native_status``
compares the two paths with the installed Pillow before the first use.

The extension is a submodule of the serving package, and its C source (``resample.c``) sits next
to this file, so a model carries both in its copy of the package. Where that copy's binary does
not match the interpreter (another Python or platform: Python then does not import it), the
source is compiled once with the machine's C compiler into a cache
(``$XDG_CACHE_HOME/mlflow-clip/native``, else ``~/.cache``, else a temporary folder). Without a
compiler, or with ``MLFLOW_CLIP_NATIVE_RESAMPLE=0``, Pillow does the work: same pixels, slower.

Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
pixels as the width; earlier releases always run the horizontal pass first. Which rule the
installed Pillow follows is read off a probe image, once.

Serving side: never imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

ENV_VAR = "MLFLOW_CLIP_NATIVE_RESAMPLE"
API_VERSION = 1
NATIVE_FILTERS = ("box", "bilinear", "hamming", "bicubic", "lanczos")
MODULE_NAME = "_mlflow_clip_resample"
SOURCE = Path(__file__).with_name("resample.c")
# The flags setup.py builds with. No fused multiply-add: the weights must round as Pillow's do.
COMPILE_FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared")
COMPILE_TIMEOUT_SECONDS = 120

try:  # built by setup.py into this package; optional, so a serving environment without it works
    from . import _mlflow_clip_resample as _extension  # type: ignore[attr-defined]
except ImportError:  # another interpreter or platform than the one that built it, or no build
    _extension = None
_origin = "built" if _extension is not None else ""


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def ensure_extension() -> str | None:
    """Make the extension importable if it can be (compiling the source here if needed);
    None when it is, else why not."""
    global _extension, _origin
    if not enabled():
        return f"{ENV_VAR} turns it off"
    if _extension is None:
        try:
            _extension, _origin = _compile_from_source(), "compiled here from the model's source"
        except _CannotCompile as e:
            return f"the extension is not built for this interpreter and {e}"
    if getattr(_extension, "API_VERSION", None) != API_VERSION:
        return f"{MODULE_NAME} has API {getattr(_extension, 'API_VERSION', None)}, expected {API_VERSION}"
    return None


class _CannotCompile(Exception):
    pass


def _compile_from_source() -> ModuleType:
    if not SOURCE.is_file():
        raise _CannotCompile(f"its source {SOURCE.name} is missing")
    compiler = (
        shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) or shutil.which("cc") or shutil.which("gcc")
    )
    include = Path(sysconfig.get_paths()["include"])
    if compiler is None:
        raise _CannotCompile("no C compiler is installed")
    if not (include / "Python.h").is_file():
        raise _CannotCompile(f"Python's headers are not installed (no {include / 'Python.h'})")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    digest = hashlib.sha256(SOURCE.read_bytes() + suffix.encode() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / digest / f"{MODULE_NAME}{suffix}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{uuid.uuid4().hex}{suffix}")
        command = [compiler, *COMPILE_FLAGS, f"-I{include}", str(SOURCE), "-o", str(partial), "-lm"]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=COMPILE_TIMEOUT_SECONDS)
        except (OSError, subprocess.SubprocessError) as e:
            partial.unlink(missing_ok=True)
            raise _CannotCompile(f"compiling its source failed ({type(e).__name__})") from None
        os.replace(partial, target)  # atomic: concurrent processes never see half a file
    spec = importlib.util.spec_from_file_location(f"{__package__}.{MODULE_NAME}", target)
    if spec is None or spec.loader is None:
        raise _CannotCompile(f"{target} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cache_dir() -> Path:
    for base in (os.environ.get("XDG_CACHE_HOME"), str(Path.home() / ".cache") if Path.home() != Path("/") else None):
        if base:
            candidate = Path(base) / "mlflow-clip" / "native"
            try:
                candidate.mkdir(parents=True, exist_ok=True)
                if os.access(candidate, os.W_OK):
                    return candidate
            except OSError:
                continue
    return Path(tempfile.gettempdir()) / f"mlflow-clip-native-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def vertical_first(width: int, height: int, new_width: int, new_height: int) -> bool:
    """Whether the installed Pillow resizes ``width x height`` to ``new_width x new_height``
    with the vertical pass first (only matters when both sides change)."""
    return _pillow_rule() and new_height < height and height - new_height > 2 * (width - new_width)


def built() -> bool:
    """True when the extension is loaded with the API this module speaks."""
    return _extension is not None and getattr(_extension, "API_VERSION", None) == API_VERSION


def origin() -> str:
    """Where the loaded extension came from, for logs."""
    where = getattr(_extension, "__file__", None) or MODULE_NAME
    return f"{_origin}: {where}" if _origin else where


def resize_crop_into(
    image: Image.Image,
    new_size: tuple[int, int],
    origin: tuple[int, int],
    size: int,
    resample: str,
    table: np.ndarray,
    out: np.ndarray,
) -> None:
    """Resize an RGB or L ``image`` to ``new_size``, crop ``size`` x ``size`` at ``origin`` and
    write the normalized float32 ``[3, size, size]`` into ``out`` (only when ``built()``)."""
    if _extension is None:
        raise RuntimeError(f"the {MODULE_NAME} extension is not loaded")
    channels = 1 if image.mode == "L" else 3
    pixels: Any
    try:  # Pillow's Arrow export: no copy (RGB rows are 4 bytes per pixel there)
        pixels = image.__arrow_c_array__()
        channels = 1 if channels == 1 else 4
    except (AttributeError, ValueError):  # older Pillow, or rows not contiguous (large images)
        pixels = np.asarray(image)
    new_width, new_height = new_size
    _extension.resize_crop(
        pixels,
        image.width,
        image.height,
        channels,
        new_width,
        new_height,
        origin[0],
        origin[1],
        size,
        resample,
        vertical_first(image.width, image.height, new_width, new_height),
        table,
        out,
    )


@functools.cache
def _pillow_rule() -> bool:
    """Whether the installed Pillow picks the vertical pass first for tall reductions."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 20, 3), dtype=np.uint8))
    bicubic = Image.Resampling.BICUBIC
    both = np.asarray(image.resize((15, 5), bicubic))
    vertical = np.asarray(image.resize((20, 5), bicubic).resize((15, 5), bicubic))
    horizontal = np.asarray(image.resize((15, 60), bicubic).resize((15, 5), bicubic))
    return bool(np.array_equal(both, vertical) and not np.array_equal(both, horizontal))
