"""The native resize + crop + normalize pass: built, bit-identical to Pillow, and safe to fall back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

from mlflow_clip.demo_data import make_photo_jpeg
from mlflow_clip.serving import _mlflow_clip_resample as extension  # setup.py builds it; see test_built
from mlflow_clip.serving import resample
from mlflow_clip.serving.images import decode_image
from mlflow_clip.serving.preprocess import Preprocessor, compute_crop_origin, compute_resized_size, native_status


def _image(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    shape = (height, width) if mode == "L" else (height, width, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[rng.random(shape) < 0.2] = 255  # hard edges: the sums overshoot and get clipped
    return Image.fromarray(pixels, mode)


def test_built_and_checked_against_the_installed_pillow():
    assert resample.built()
    assert native_status().available, native_status().reason
    assert "identical to Pillow" in native_status().reason


@pytest.mark.parametrize("seed", range(4))
def test_identical_to_pillow_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    for case in range(40):
        width, height = (int(v) for v in rng.integers(1, 700, 2))
        if case % 5 == 0:  # very tall or very wide: the other pass order, and 1-pixel sides
            width, height = (int(rng.integers(1, 30)), int(rng.integers(300, 2500)))[:: 1 if case % 2 else -1]
        size = int(rng.choice([224, 336, 64, 9]))
        filter_name = resample.NATIVE_FILTERS[case % len(resample.NATIVE_FILTERS)]
        image = _image(rng, width, height, "L" if case % 4 == 3 else "RGB")
        expected = Preprocessor(size, resample=filter_name, native=False)(image)
        got = Preprocessor(size, resample=filter_name, native=True)(image)
        assert np.array_equal(expected, got), (width, height, size, filter_name, image.mode)


@pytest.mark.parametrize("width, height", [(640, 480), (1920, 1080), (1080, 1920), (4000, 3000), (300, 2000)])
def test_identical_on_photos(width, height):
    for seed in range(2):
        image = decode_image(make_photo_jpeg(width, height, seed))
        np.testing.assert_array_equal(Preprocessor(224, native=True)(image), Preprocessor(224, native=False)(image))


def test_pass_order_rule_matches_pillow():
    """The rule for Pillow's pass order, compared with what Pillow actually does."""
    rng = np.random.default_rng(7)
    bicubic = Image.Resampling.BICUBIC
    seen = set()
    for _ in range(150):
        width, height = (int(v) for v in rng.integers(8, 160, 2))
        new_width = int(rng.integers(1, width))
        new_height = height - 2 * (width - new_width) + int(rng.integers(-3, 4))  # near the boundary
        if not 1 <= new_height < height:
            continue
        image = _image(rng, width, height, "RGB")
        both = np.asarray(image.resize((new_width, new_height), bicubic))
        horizontal = np.asarray(image.resize((new_width, height), bicubic).resize((new_width, new_height), bicubic))
        vertical = np.asarray(image.resize((width, new_height), bicubic).resize((new_width, new_height), bicubic))
        if np.array_equal(horizontal, vertical):
            continue  # this image cannot tell the orders apart
        first = resample.vertical_first(width, height, new_width, new_height)
        assert np.array_equal(both, vertical if first else horizontal), (width, height, new_width, new_height)
        seen.add(first)
    assert seen == {True, False} or not resample._pillow_rule()


def test_large_images_without_arrow_export_use_a_copy_and_stay_identical():
    """Pillow cannot export a 12 MP image's rows without a copy; the native pass reads numpy's."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(np.repeat(rng.integers(0, 256, (3000, 1, 3), dtype=np.uint8), 4000, axis=1))
    with pytest.raises(ValueError):
        image.__arrow_c_array__()
    np.testing.assert_array_equal(Preprocessor(224, native=True)(image), Preprocessor(224, native=False)(image))


def test_a_native_pass_that_differs_from_pillow_is_not_used(monkeypatch):
    class Wrong:
        API_VERSION = resample.API_VERSION

        @staticmethod
        def resize_crop(*args):
            args[-1][...] = 0.0  # plausible shape, wrong values

    monkeypatch.setattr(resample, "_extension", Wrong)
    native_status.cache_clear()
    try:
        assert not native_status().available
        assert "differs from Pillow" in native_status().reason
        image = _image(np.random.default_rng(0), 300, 200, "RGB")
        np.testing.assert_array_equal(Preprocessor(64)(image), Preprocessor(64, native=False)(image))
    finally:
        native_status.cache_clear()


def test_environment_switch_turns_it_off():
    code = (
        "from mlflow_clip.serving.preprocess import native_status; "
        "print(native_status().available, native_status().reason)"
    )
    env = {**os.environ, resample.ENV_VAR: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("False") and resample.ENV_VAR in out


def _call(pixels, width=4, height=3, channels=3, size=2, table=None, out=None, **kw):
    args = dict(new_width=4, new_height=3, left=0, top=0, filter="bicubic", vertical_first=False)
    args.update(kw)
    table = np.zeros((3, 256), np.float32) if table is None else table
    out = np.zeros((3, size, size), np.float32) if out is None else out
    extension.resize_crop(
        pixels,
        width,
        height,
        channels,
        args["new_width"],
        args["new_height"],
        args["left"],
        args["top"],
        size,
        args["filter"],
        args["vertical_first"],
        table,
        out,
    )
    return out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pixels=np.zeros(10, np.uint8)), "width \\* height \\* channels"),
        (dict(channels=2), "channels=2"),
        (dict(left=3), "inside the resized image"),
        (dict(size=5), "inside the resized image"),
        (dict(width=0), "between 1 and"),
        (dict(filter="nearest"), "expected box, bilinear"),
        (dict(table=np.zeros((3, 255), np.float32)), "table must be"),
        (dict(out=np.zeros((3, 3, 3), np.float32)), "out must be"),
        (dict(pixels=("not", "capsules")), "not an Arrow export"),
    ],
)
def test_bad_arguments_raise_instead_of_reading_out_of_bounds(kwargs, message):
    kwargs.setdefault("pixels", np.zeros((3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=message):
        _call(**kwargs)


@pytest.mark.parametrize("width, height", [(50, 40), (100, 1000), (640, 480), (60, 2000), (300, 300), (7, 5)])
@pytest.mark.parametrize("source", ["arrow-rgb", "array-rgb", "arrow-gray", "array-gray"])
def test_every_pixel_source_gives_the_same_values(source, width, height):
    """Pillow's Arrow export (4-byte RGB pixels, read in place) and packed numpy arrays (3-byte
    pixels) take different native kernels; tall shapes take Pillow's vertical-first order."""
    rng = np.random.default_rng(width * height)
    image = _image(rng, width, height, "L" if source.endswith("gray") else "RGB")
    preprocessor = Preprocessor(32, native=False)
    new_size = compute_resized_size(width, height, 32)
    if source.startswith("arrow"):
        pixels, channels = image.__arrow_c_array__(), (4 if image.mode == "RGB" else 1)
    else:
        pixels, channels = np.asarray(image), (3 if image.mode == "RGB" else 1)
    out = np.empty((3, 32, 32), np.float32)
    extension.resize_crop(
        pixels,
        width,
        height,
        channels,
        *new_size,
        *compute_crop_origin(*new_size, 32),
        32,
        "bicubic",
        resample.vertical_first(width, height, *new_size),
        preprocessor._table,
        out,
    )
    np.testing.assert_array_equal(out, preprocessor(image))


def test_portable_scalar_pass_is_identical_too(tmp_path):
    """CPUs without AVX2 (and non-x86 builds) take the scalar pass: build it and check it here."""
    import shutil
    import sysconfig

    compiler = shutil.which(sysconfig.get_config_var("CC").split()[0]) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    source = ROOT / "mlflow_clip" / "serving" / "resample.c"
    target = tmp_path / f"_mlflow_clip_resample{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [
            compiler,
            "-O2",
            "-ffp-contract=off",
            "-DMLFLOW_CLIP_NO_SIMD",
            "-fPIC",
            "-shared",
            f"-I{sysconfig.get_paths()['include']}",
            str(source),
            "-o",
            str(target),
            "-lm",
        ],
        check=True,
        capture_output=True,
    )
    code = """
import importlib.util, sys
import mlflow_clip.serving
spec = importlib.util.spec_from_file_location("mlflow_clip.serving._mlflow_clip_resample", %r)
ext = importlib.util.module_from_spec(spec); spec.loader.exec_module(ext)
sys.modules[spec.name] = ext  # what `from . import _mlflow_clip_resample` then finds
import numpy as np
from PIL import Image
from mlflow_clip.serving import resample
from mlflow_clip.serving.preprocess import Preprocessor, compute_crop_origin, compute_resized_size, native_status
assert ext.__file__.startswith(%r), ext.__file__
assert native_status().available, native_status().reason  # every filter, both orders, gray and RGB
rng = np.random.default_rng(11)
for width, height in [(1920, 1080), (100, 1000), (300, 300), (37, 23)]:
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    expected = Preprocessor(224, native=False)(image)
    assert np.array_equal(Preprocessor(224, native=True)(image), expected), (width, height)
    new_size = compute_resized_size(width, height, 224)
    out = np.empty_like(expected)  # packed 3-byte pixels
    ext.resize_crop(np.asarray(image), width, height, 3, *new_size, *compute_crop_origin(*new_size, 224), 224,
                    "bicubic", resample.vertical_first(width, height, *new_size), Preprocessor(224)._table, out)
    assert np.array_equal(out, expected), (width, height)
print("ok")
""" % (str(target), str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("filter_name", resample.NATIVE_FILTERS)
def test_an_axis_that_keeps_its_size_is_copied_as_pillow_skips_it(filter_name):
    """Pillow runs no pass on such an axis; the native pass runs one with identity weights."""
    rng = np.random.default_rng(9)
    image = _image(rng, 90, 70, "RGB")
    table = Preprocessor(32)._table
    for new_size in ((90, 50), (60, 70), (90, 70)):
        expected = np.asarray(
            image.resize(new_size, getattr(Image.Resampling, filter_name.upper())).crop((3, 4, 35, 36))
        )
        expected = np.stack([table[c][expected[:, :, c]] for c in range(3)])
        out = _call(
            np.asarray(image),
            90,
            70,
            3,
            size=32,
            table=table,
            new_width=new_size[0],
            new_height=new_size[1],
            left=3,
            top=4,
            filter=filter_name,
        )
        np.testing.assert_array_equal(out, expected)


@pytest.fixture()
def model_without_binary(colour_onnx, tmp_path, monkeypatch) -> Path:
    """A model saved where no binary was built (it carries the C source only)."""
    import mlflow_clip.flavor

    files = mlflow_clip.flavor.serving_package_files
    monkeypatch.setattr(mlflow_clip.flavor, "serving_package_files", lambda: [f for f in files() if f.suffix != ".so"])
    mlflow_clip.flavor.save_model(colour_onnx, tmp_path / "model")
    assert not list((tmp_path / "model").glob("code/*/_mlflow_clip_resample*"))
    return tmp_path / "model"


_BLOCK_LIBRARY = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):  # an environment built from the model alone
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "mlflow_clip":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
"""


def _resize_path(model: Path, env: dict, prelude: str = "") -> str:
    """What the model's own code says resizes images (as its loader logs it), in a new process."""
    (package,) = [p.name for p in (model / "code").iterdir()]
    code = prelude + (
        f"import importlib, sys; sys.path.insert(0, {str(model / 'code')!r}); "
        f"print(importlib.import_module({package!r} + '.preprocess').native_status().describe())"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=model.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_a_model_without_a_fitting_binary_uses_the_installed_build_then_a_private_compile(
    model_without_binary, tmp_path
):
    """Where the binary a model carries does not import (another Python or platform, or none was
    built), the installed mlflow-clip's binary serves if it was built from the same source; else
    the source is compiled once into a private cache, whose binary is checked before each load."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    cache = tmp_path / "cache" / "mlflow-clip" / "native"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert _resize_path(model_without_binary, env).startswith("native (the installed mlflow-clip's build of the same")
    assert not cache.exists()  # nothing compiled
    for attempt in ("compiles", "reuses its binary"):
        said = _resize_path(model_without_binary, env, _BLOCK_LIBRARY)
        assert said.startswith("native (compiled here from the model's source, in a private cache"), (attempt, said)
        (binary,) = cache.glob("_mlflow_clip_resample-*.so")
        if attempt == "compiles":
            first = binary.stat().st_mtime_ns
    assert binary.stat().st_mtime_ns == first and oct(cache.stat().st_mode & 0o777) == "0o700"
    binary.write_bytes(binary.read_bytes() + b"\0")  # not the binary whose SHA-256 was recorded: compiled again
    assert _resize_path(model_without_binary, env, _BLOCK_LIBRARY).startswith("native (compiled here")
    assert binary.stat().st_mtime_ns != first and resample._recorded_binary(binary) == binary
    off = _resize_path(model_without_binary, {**env, resample.ENV_VAR: "0"})
    assert off.startswith("Pillow (MLFLOW_CLIP_NATIVE_RESAMPLE turns it off")


def test_the_private_cache_is_closed_to_others_or_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "mlflow-clip").mkdir(mode=0o755)  # as earlier releases left it
    folder = resample.private_cache_dir()
    assert folder == tmp_path / "mlflow-clip" / "native"
    assert {oct(p.stat().st_mode & 0o777) for p in (folder, folder.parent)} == {"0o700"}
    if os.geteuid() == 0:  # a folder someone else owns is never used
        os.chown(folder, 65534, 65534)
        with pytest.raises(resample._Unavailable, match="is not a folder of this user's"):
            resample.private_cache_dir()
    os.rmdir(folder)
    folder.symlink_to(tmp_path)
    with pytest.raises(resample._Unavailable, match="is not a folder of this user's"):
        resample.private_cache_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/")
    with pytest.raises(resample._Unavailable, match="no private cache folder"):
        resample.private_cache_dir()
