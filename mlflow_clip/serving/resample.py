"""The binding to the native resize + crop + normalize (`_mlflow_clip_resample`).

The extension computes only the pixels CLIP's center crop keeps, with Pillow's own fixed-point
arithmetic, so its output is bit-for-bit the output of ``Image.resize`` + ``Image.crop`` +
the normalization table. That equality is not taken on trust: ``preprocess.native_status``
compares the two paths with the installed Pillow before the first use.

The extension is a submodule of the serving package, and its C source (``resample.c``) sits next
to this file, so a model carries both in its copy of the package (the manifest covers both; a
model's copy loads the binary only after checking it against its digest, ``integrity.py``). Which
binary serves, in order:

1. the one the package carries, where Python imports it (the interpreter and platform it was
   built for) and it was built from the source next to it (``SOURCE_SHA256``, set by the build);
2. in a model's copy, the installed mlflow-clip's binary, when it was built from the same source
   (its ``SOURCE_SHA256`` equals the SHA-256 of the model's ``resample.c``): no compiler needed;
3. the source compiled here with the machine's C compiler, only into a private per-user cache
   (``$XDG_CACHE_HOME/mlflow-clip/native``, else ``~/.cache/mlflow-clip/native``; created 0700,
   its owner and mode checked before every use, never a shared temporary folder), with the
   binary's SHA-256 recorded beside it and checked before it is loaded.

Otherwise (no compiler, no private cache, or ``MLFLOW_CLIP_NATIVE_RESAMPLE=0``) Pillow does the
work: the same pixels, slower.

Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
pixels as the width; earlier releases always run the horizontal pass first. Which rule the
installed Pillow follows is read off a probe image, once.

Serving side: never imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import stat
import subprocess
import sysconfig
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from .errors import InternalError

ENV_VAR = "MLFLOW_CLIP_NATIVE_RESAMPLE"
API_VERSION = 1
NATIVE_FILTERS = ("box", "bilinear", "hamming", "bicubic", "lanczos")
MODULE_NAME = "_mlflow_clip_resample"
SOURCE = Path(__file__).with_name("resample.c")
# The flags setup.py builds with. No fused multiply-add: the weights must round as Pillow's do.
COMPILE_FLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared")
COMPILE_TIMEOUT_SECONDS = 120

INSTALLED_PACKAGE = "mlflow_clip.serving"
try:  # built by setup.py into this package; optional, so a serving environment without it works
    from . import _mlflow_clip_resample as _extension  # type: ignore[attr-defined]
except ImportError:  # another interpreter or platform than the one that built it, or no build
    _extension = None
_origin = ("installed" if __package__ == INSTALLED_PACKAGE else "carried by the model") if _extension else ""


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def ensure_extension() -> str | None:
    """Make the extension usable if it can be (see the module's docstring for the order);
    None when it is, else why not."""
    global _extension, _origin
    if not enabled():
        return f"{ENV_VAR} turns it off"
    reasons = []
    if _extension is not None and not _built_from_source(_extension, required=False):
        reasons.append(f"the binary {_origin} was built from another source")
        _extension, _origin = None, ""
    if _extension is None:
        for attempt in (_installed_build, _compile_from_source):
            try:
                _extension, _origin = attempt()
                break
            except _Unavailable as e:
                reasons.append(str(e))
        else:
            return "; ".join(["no binary fits this interpreter", *reasons])
    if getattr(_extension, "API_VERSION", None) != API_VERSION:
        return f"{MODULE_NAME} has API {getattr(_extension, 'API_VERSION', None)}, expected {API_VERSION}"
    return None


class _Unavailable(Exception):
    pass


@functools.cache
def source_sha256() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest() if SOURCE.is_file() else ""


def _built_from_source(module: ModuleType, required: bool) -> bool:
    """Whether `module` records the SHA-256 of this package's `resample.c` (a binary built
    before binaries recorded it passes unless `required`)."""
    recorded = getattr(module, "SOURCE_SHA256", None)
    return recorded == source_sha256() if recorded is not None or required else True


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{__package__}.{MODULE_NAME}", path)
    if spec is None or spec.loader is None:
        raise _Unavailable(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise _Unavailable(f"{path.name} does not import here ({e})") from None
    return module


def _installed_build() -> tuple[ModuleType, str]:
    """The installed mlflow-clip's binary, if it was built from this model's source."""
    if __package__ == INSTALLED_PACKAGE:
        raise _Unavailable("this is the installed package")
    try:
        spec = importlib.util.find_spec(INSTALLED_PACKAGE.split(".")[0])  # finds it without importing it
    except (ImportError, ValueError):
        spec = None
    folders = [Path(p) / "serving" for p in (spec.submodule_search_locations or [])] if spec else []
    binaries = [f / f"{MODULE_NAME}{s}" for f in folders for s in importlib.machinery.EXTENSION_SUFFIXES]
    found = next((b for b in binaries if b.is_file()), None)
    if found is None:
        raise _Unavailable("mlflow-clip is not installed here with its binary")
    module = _load(found)
    if not _built_from_source(module, required=True):
        raise _Unavailable("the installed mlflow-clip's binary was built from another source")
    return module, "the installed mlflow-clip's build of the same source"


def _compile_from_source() -> tuple[ModuleType, str]:
    if not source_sha256():
        raise _Unavailable(f"its source {SOURCE.name} is missing")
    compiler = (
        shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) or shutil.which("cc") or shutil.which("gcc")
    )
    include = Path(sysconfig.get_paths()["include"])
    if compiler is None:
        raise _Unavailable("no C compiler is installed")
    if not (include / "Python.h").is_file():
        raise _Unavailable(f"Python's headers are not installed (no {include / 'Python.h'})")
    cache = private_cache_dir()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    flags = [*COMPILE_FLAGS, f'-DMLFLOW_CLIP_SOURCE_SHA256="{source_sha256()}"']
    key = hashlib.sha256(f"{source_sha256()} {suffix} {compiler} {' '.join(flags)}".encode()).hexdigest()[:16]
    target = cache / f"{MODULE_NAME}-{key}{suffix}"
    if _recorded_binary(target) is None:
        partial = cache / f".{uuid.uuid4().hex}{suffix}"
        command = [compiler, *flags, f"-I{include}", str(SOURCE), "-o", str(partial), "-lm"]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=COMPILE_TIMEOUT_SECONDS)
            digest = hashlib.sha256(partial.read_bytes()).hexdigest()
            _digest_file(partial).write_text(digest)
        except (OSError, subprocess.SubprocessError) as e:
            partial.unlink(missing_ok=True)
            raise _Unavailable(f"compiling its source failed ({type(e).__name__})") from None
        os.replace(_digest_file(partial), _digest_file(target))
        os.replace(partial, target)  # atomic: concurrent processes never see half a file
    if _recorded_binary(target) is None:
        raise _Unavailable(f"the compiled binary {target.name} does not match its recorded SHA-256")
    return _load(target), "compiled here from the model's source, in a private cache"


def _digest_file(binary: Path) -> Path:
    return binary.with_name(binary.name + ".sha256")


def _recorded_binary(binary: Path) -> Path | None:
    """`binary` if it is a regular file of ours whose SHA-256 is the one recorded when it was
    compiled, else None."""
    try:
        info = os.lstat(binary)
        recorded = _digest_file(binary).read_text().strip()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return None
    return binary if hashlib.sha256(binary.read_bytes()).hexdigest() == recorded else None


def private_cache_dir() -> Path:
    """This user's cache for compiled binaries: created 0700, and used only while it is a real
    folder (not a link), owned by this user and closed to everyone else, as is its parent."""
    try:
        home: Path | None = Path.home()
    except RuntimeError:  # no HOME and no password entry
        home = None
    bases = [os.environ.get("XDG_CACHE_HOME"), str(home / ".cache") if home and home != Path("/") else None]
    base = next((b for b in bases if b), None)
    if base is None:
        raise _Unavailable("there is no private cache folder to compile into (set XDG_CACHE_HOME)")
    folder = Path(base) / "mlflow-clip" / "native"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (folder.parent, folder):
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise _Unavailable(f"{path} is not a folder of this user's")
            if info.st_mode & 0o077:
                os.chmod(path, 0o700)  # ours: closed to everyone else (earlier releases left it 0755)
    except OSError as e:
        raise _Unavailable(f"its cache folder {folder} cannot be used ({type(e).__name__})") from None
    return folder


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
    image: Image.Image | np.ndarray,
    new_size: tuple[int, int],
    origin: tuple[int, int],
    size: int,
    resample: str,
    table: np.ndarray,
    out: np.ndarray,
) -> None:
    """Resize an RGB or L ``image`` (or uint8 pixels, ``[H, W, 3]`` or ``[H, W]``, C-contiguous)
    to ``new_size``, crop ``size`` x ``size`` at ``origin`` and write the normalized float32
    ``[3, size, size]`` into ``out`` (only when ``built()``)."""
    if _extension is None:
        raise InternalError(f"the {MODULE_NAME} extension is not loaded")
    pixels: Any
    if isinstance(image, np.ndarray):
        pixels, (height, width), channels = image, image.shape[:2], 1 if image.ndim == 2 else 3
    else:
        height, width, channels = image.height, image.width, 1 if image.mode == "L" else 3
        try:  # Pillow's Arrow export: no copy (RGB rows are 4 bytes per pixel there)
            pixels = image.__arrow_c_array__()
            channels = 1 if channels == 1 else 4
        except (AttributeError, ValueError):  # older Pillow, or rows not contiguous (large images)
            pixels = np.asarray(image)
    new_width, new_height = new_size
    _extension.resize_crop(
        pixels,
        width,
        height,
        channels,
        new_width,
        new_height,
        origin[0],
        origin[1],
        size,
        resample,
        vertical_first(width, height, new_width, new_height),
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
