"""`mlflow-clip benchmark`: a given model measured on this machine, each runtime in a process of
its own, on photo-like JPEGs made here or a folder of images; checked for structure and
consistency, never for speed (torch-free: the hand-built colour model)."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ROOT, subprocess_env
from PIL import Image

from mlflow_clip.benchmark import CPU_FLAGS, Measurement, ModelBenchmark, collect_images, render_report
from mlflow_clip.cli import cli
from mlflow_clip.demo_data import make_photo_jpeg
from mlflow_clip.serving.openvino_runtime import openvino_available


def test_photo_jpegs_are_deterministic_textured_photos():
    first, again, other = make_photo_jpeg(320, 240, 0), make_photo_jpeg(320, 240, 0), make_photo_jpeg(320, 240, 1)
    assert first == again and first != other
    image = Image.open(io.BytesIO(first))
    assert image.format == "JPEG" and image.size == (320, 240) and image.mode == "RGB"
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.std() > 20  # not a flat colour
    assert np.abs(np.diff(pixels, axis=1)).mean() > 2  # texture and noise, as in camera photos
    assert len(first) * 8 / (320 * 240) > 1.0  # bits per pixel of a quality-90 photo, not of a cartoon


@pytest.fixture(scope="module")
def measured(colour_model_dir) -> dict:
    """One real run on the colour model: every installed runtime, small JPEGs, no minimum time."""
    result = CliRunner().invoke(
        cli,
        ["benchmark", "-m", str(colour_model_dir), "--size", "96x64", "--batch", "3", "--seconds", "0", "--json"],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_each_installed_runtime_is_measured_in_its_own_process(measured, colour_model_dir):
    runtimes = [m["runtime"] for m in measured["measurements"]]
    assert runtimes == (["onnxruntime", "openvino"] if openvino_available() else ["onnxruntime"])
    for m in measured["measurements"]:
        assert m["status"] == "ok", m["note"]
        assert m["precision"] == "fp32"
        assert m["requests"] >= 5 and m["images"] == 3 * m["requests"]
        assert m["images_per_s"] > 0 and m["graph_images_per_s"] > 0
        assert m["p95_ms"] >= m["p50_ms"] > 0
        assert m["peak_rss_mb"] > 50  # a whole interpreter with MLflow and the model
        assert m["load_s"] > 0 and m["cpu_ms_per_image"] > 0 and m["decode_ms_per_image"] > 0
        np.testing.assert_allclose(m["decode_share"], min(1.0, m["decode_ms_per_image"] / m["cpu_ms_per_image"]))
        assert 0 < m["decode_share"] <= 1
    engines = [m["engine"] for m in measured["measurements"]]
    assert engines[0].startswith("onnxruntime ") and all(e.startswith("OpenVINO ") for e in engines[1:])


def test_each_configuration_says_the_settings_and_commands_it_ran(measured, colour_model_dir):
    threads = measured["threads"]
    assert threads >= 1
    for m in measured["measurements"]:
        assert m["model_config"] == {"runtime": m["runtime"], "intra_op_num_threads": threads}
        assert m["settings"]["runtime"] == m["runtime"] and m["settings"]["intra_op_num_threads"] == threads
        assert m["settings"]["jpeg_draft"] is False  # an fp32 model decodes exactly
        call = f"mlflow.pyfunc.load_model({str(colour_model_dir)!r}, model_config={json.dumps(m['model_config'])})"
        assert m["python"] == call
        serve = shlex.split(m["serve"])
        assert serve[0] == "MLFLOW_PYFUNC_INFERENCE_CONFIG=" + json.dumps(m["model_config"])
        assert serve[1:] == ["mlflow", "models", "serve", "-m", str(colour_model_dir), "--env-manager", "local"]
    again = shlex.split(measured["command"])
    assert again[:4] == ["mlflow-clip", "benchmark", "-m", str(colour_model_dir)]
    assert again[again.index("--threads") + 1] == str(threads) and again[again.index("--size") + 1] == "96x64"


def test_the_machine_and_its_cpu_flags_are_stated(measured):
    flags = next(
        (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
    ).split()
    machine = measured["machine"]
    assert machine["cpu_flags"] == [flag for flag in CPU_FLAGS if flag in flags]
    assert machine["native_bf16"] is ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert machine["loadavg_start"] is not None and machine["loadavg_end"] is not None
    assert measured["images"].startswith("16 photo-like JPEGs of 96x64")


def test_the_report_is_a_table_with_one_row_per_configuration(measured):
    run = ModelBenchmark(**{**measured, "measurements": []})
    run.measurements = [Measurement(**m) for m in measured["measurements"]]
    text = render_report(run)
    rows = [line for line in text.splitlines() if line.startswith("| fp32 |")]
    assert len(rows) == len(run.measurements)
    assert all(row.count("|") == 12 for row in rows)
    assert f"{run.measurements[0].images_per_s:.1f}" in rows[0]
    assert "Machine: " in text and "native bf16: " in text and f"Repeat: `{run.command}`" in text
    assert text.count("  - serve: `MLFLOW_PYFUNC_INFERENCE_CONFIG=") == len(run.measurements)


def test_a_folder_of_images_is_read_by_name(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "1.JPG", "notes.txt", "b/3.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in collect_images(tmp_path)] == ["1.JPG", "b/2.png", "b/3.webp"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "640x"], "Received --size '640x'; expected WIDTHxHEIGHT"),
        (["--runtimes", "tensorrt"], "Received --runtimes 'tensorrt'; expected any of ['onnxruntime', 'openvino']"),
        (["--batch", "0"], "expected a batch of 1 or more"),
        (["--images", "{empty}"], "which holds no images"),
    ],
)
def test_bad_input_is_one_line_with_the_fix(args, message, colour_model_dir, tmp_path):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli, ["benchmark", "-m", str(colour_model_dir), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_model_that_cannot_be_read_is_refused_with_the_fix(tmp_path):
    result = CliRunner().invoke(cli, ["benchmark", "-m", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "expected a model URI" in result.output
    (tmp_path / "MLmodel").write_text("flavors:\n  python_function: {}\n")
    result = CliRunner().invoke(cli, ["benchmark", "-m", str(tmp_path)])
    assert result.exit_code == 2 and "is not an mlflow_clip model" in result.output


@pytest.mark.slow
def test_the_example_prints_how_to_serve_the_fastest_configuration(colour_model_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "benchmark.py"), str(colour_model_dir), "--size", "80x60"]
        + ["--seconds", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *_, headline, serve = done.stdout.strip().splitlines()
    assert headline.startswith("Fastest here: fp32 on ") and headline.endswith("Serve it so:")
    assert serve.startswith("MLFLOW_PYFUNC_INFERENCE_CONFIG=") and str(colour_model_dir) in serve
