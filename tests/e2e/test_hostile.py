"""Hostile traffic against a real `mlflow models serve` (one worker) and `mlflow-clip serve`.

Each hostile request is made on the spot (`benchmarks.hostile`, which the benchmark's
hostile soak sends too) and must be answered with a short 400 that names the problem, contains
no request bytes, and costs the server under a second of CPU; the server then answers a good
request. A request past its deadline frees the worker; memory stays
flat under requests carrying 10 MB label sets."""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import costly_images as costly
import numpy as np
import pytest
from helpers import demo_image_bytes, free_port, requires_export, start_server, stop_process, subprocess_env
from helpers import wait_for_http as wait_ready
from packaging.version import Version
from PIL import Image

from benchmarks.hostile import hostile_cases, label_flood_body
from benchmarks.measure import process_tree, tree_cpu_seconds, tree_rss_mb

requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.slow, requires_export]

CPU_BUDGET = 1.0  # server CPU seconds any refused request may cost
SHORT = 1000  # characters: every error message is shorter than this
TIMEOUT = 2  # the slow server's request timeout, seconds
ROOT = Path(__file__).resolve().parents[2]


class Server:
    def __init__(self, url: str, process):
        self.url, self.process = url, process

    def post(self, body, **kwargs) -> requests.Response:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        headers = {"Content-Type": kwargs.pop("content_type", "application/json")}
        return requests.post(self.url + "/invocations", data=body, headers=headers, timeout=120, **kwargs)

    def cpu(self) -> float:
        return tree_cpu_seconds(self.process.pid)

    def assert_serving(self) -> None:
        good = _b64(demo_image_bytes([("a red circle", "PNG")])[0][0])
        response = self.post({"inputs": {"image": [good]}})
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "a red circle"


def _start(argv: list[str], log: Path, **env: str) -> Server:
    port = free_port()
    process = start_server([*argv, "-h", "127.0.0.1", "-p", str(port)], log, subprocess_env(**env))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/ping", process)
    except Exception:
        stop_process(process)
        raise
    return Server(url, process)


def _mlflow_serve(model_dir: Path, log: Path, **env: str) -> Server:
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local"]
    return _start([*argv, "-w", "1"], log, **env)


@pytest.fixture(scope="module")
def plain(demo_model_dir, module_tmp):
    server = _mlflow_serve(demo_model_dir, module_tmp("plain") / "server.log")
    yield server
    stop_process(server.process)


@pytest.fixture(scope="module")
def guarded(demo_model_dir, module_tmp):
    cli = str(Path(sys.executable).with_name("mlflow-clip"))
    argv = [cli, "serve", "-m", str(demo_model_dir), "-w", "1", "--max-body-mb", "4"]
    server = _start(argv, module_tmp("guarded") / "server.log")
    yield server
    stop_process(server.process)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _good_image() -> str:
    return _b64(demo_image_bytes([("a red circle", "PNG")])[0][0])


_WORD = "".join(np.random.default_rng(0).choice(list("abcdefghijklmnopqrstuvwxyz"), 988))
COSTLY = {  # name -> (builder of the body, a phrase its 400 must contain); each body under 1 MB
    "a 2000x2000 progressive JPEG of 6,000 scans": (
        lambda: costly.jpeg_progressive_scans(2000, 6000),
        "max_jpeg_scans",
    ),
    "a 50 MP progressive JPEG of 100 scans": (
        lambda: costly.jpeg_progressive_scans(costly.FULL_SIDE, 100),
        "max_decode_ms",
    ),
    "a padded 7000x7000 lossless WebP": (
        lambda: costly.webp_padded(costly.webp_lossless_flat(7000), 60_000),
        "bytes of image data",
    ),
    "a 50 MP 16-bit RGBA PNG": (lambda: costly.png_wide(costly.FULL_SIDE), "max_decode_ms"),
    "a 50 MP RLE BMP": (lambda: costly.bmp_rle_line_ends(2000, 25_000), "max_decode_ms"),
    "a JPEG of 150,000 empty segments": (lambda: costly.jpeg_segment_flood(150_000), "max_image_parts"),
}


def _assert_clean_refusal(response: requests.Response, body: dict, phrase: str) -> None:
    assert response.status_code == 400, response.text[:500]
    assert len(response.text) < SHORT, response.text[:500]
    assert "stack_trace" not in response.json() and "Traceback" not in response.text
    assert phrase in response.json()["message"]
    for column in body.get("inputs", {}).values():
        for cell in column:
            if isinstance(cell, str) and len(cell) >= 40:
                assert cell[:40] not in response.text and cell[-40:] not in response.text
    for value in json.dumps(body.get("params", {})).split('"'):
        assert len(value) < 40 or value[:40] not in response.text


@pytest.mark.parametrize("name", list(hostile_cases("")))  # the names; each body is built in its test
def test_each_hostile_request_is_a_short_400_under_a_second_of_cpu(plain, name):
    build, phrase = hostile_cases(_good_image())[name]
    _assert_refused_cheaply(plain, build(), phrase)


def _assert_refused_cheaply(server: Server, body: dict, phrase: str) -> None:
    """A short 400 naming `phrase`, under a second of the server's CPU (read from /proc), and
    the server serving after it."""
    assert len(json.dumps(body)) < 1_000_000
    before = server.cpu()
    response = server.post(body)
    time.sleep(0.2)  # any work left running after the answer is counted too
    spent = server.cpu() - before
    _assert_clean_refusal(response, body, phrase)
    assert spent < CPU_BUDGET, f"the request cost the server {spent:.2f} s of CPU"
    server.assert_serving()


@pytest.mark.parametrize("name", list(COSTLY))
def test_each_costly_image_is_refused_from_its_bytes_under_a_second_of_cpu(plain, name):
    """Each of these cost 2 to 180 CPU seconds to decode (or to open) before its check."""
    build, phrase = COSTLY[name]
    body = {"inputs": {"image": [_good_image(), _b64(build())]}}
    _assert_refused_cheaply(plain, body, phrase)


def test_copies_of_a_long_word_are_refused_under_a_second_of_cpu(plain):
    """900 copies of one random 988-letter word (0.9 MB) counted as 988 characters and cost 37 CPU
    seconds of tokenizing (before being refused for their tokens); every copy counts now."""
    body = {"inputs": {"text": [_WORD] * 900}}
    _assert_refused_cheaply(plain, body, "max_request_text_chars")


def _slow_images(count: int = 400) -> dict:
    """`count` 1080p PNGs of about 15 KB each (about 11 s of decoding here), within every limit
    but the request's pixels, which the server under test raises."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(8):
        pixels = np.zeros((1080, 1920, 3), np.uint8)
        pixels[:, :, i % 3] = 200
        pixels[::50, ::50] = rng.integers(0, 255, (22, 39, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        images.append(_b64(buffer.getvalue()))
    return {"inputs": {"image": [images[i % 8] for i in range(count)]}}


def _slow_labels() -> dict:
    """1,000 labels with the 80-template ensemble (80,000 prompts: seconds of tokenizing and
    encoding) over the prompt limits, which the server under test raises."""
    classes = [f"a photo class number {i}" for i in range(1000)]
    return {"inputs": {"image": [_good_image()]}, "params": {"classes": classes, "templates": "ensemble"}}


def _one_costly_image() -> dict:
    """One 50 MP progressive JPEG of 100 scans (594 KB; about 4 CPU s of decoding), over
    max_decode_ms, which the server under test raises: one image's decode must stop too."""
    return {"inputs": {"image": [_b64(costly.jpeg_progressive_scans(costly.FULL_SIDE, 100))]}}


SLOW_LIMITS = {
    "max_request_pixels": 10**10,
    "max_request_decode_ms": 10**9,
    "max_decode_ms": 10**9,
    "max_prompts": 10**6,
    "max_prompt_tokens": 10**8,
    "max_request_text_chars": 10**8,
}


@pytest.fixture(scope="module")
def slow(demo_model_dir, module_tmp):
    """A server with a 2 s request timeout and the request budgets lifted."""
    server = _mlflow_serve(
        demo_model_dir,
        module_tmp("slow") / "server.log",
        MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=str(TIMEOUT),
        MLFLOW_PYFUNC_INFERENCE_CONFIG=json.dumps(SLOW_LIMITS),
    )
    yield server
    stop_process(server.process)


@pytest.mark.parametrize(
    "slow_body", [_slow_images, _slow_labels, _one_costly_image], ids=["images", "labels", "one image"]
)
def test_a_timed_out_request_frees_the_worker(slow, slow_body):
    """A request of about 4 to 10 s of CPU against a 2 s timeout: the server answers 504 at the
    timeout and stops within a piece of work (between chunks, slices of prompts, or blocks of
    one image's bytes), instead of working on for the rest. (After the model stops, MLflow
    formats the request into its error message: the bodies are kept to a few MB, where that
    costs about 0.1 s.)"""
    body = json.dumps(slow_body())
    assert len(body) < 8_000_000
    before = slow.cpu()
    response = slow.post(body)
    at_answer = slow.cpu()
    assert response.status_code == 504, response.text[:300]
    time.sleep(3)
    after = slow.cpu() - at_answer
    assert after < CPU_BUDGET, f"the server worked {after:.2f} CPU s after answering 504"
    assert at_answer - before < 4 * TIMEOUT  # two threads at most, for the timeout and one piece
    started = time.monotonic()
    slow.assert_serving()
    assert time.monotonic() - started < 2 * TIMEOUT  # the worker is free: no queue behind the dead request


def test_memory_stays_flat_under_10_mb_label_sets_and_many_label_sets(plain):
    """100 requests carrying 10 MB label sets (refused, after MLflow parsed them) and 300 distinct
    label sets the model embeds and caches: the server's RSS after them is within 100 MB of its
    RSS after the first few."""
    huge_body = label_flood_body(_good_image())
    assert len(huge_body) > 10_000_000

    def distinct(i: int) -> dict:
        classes = [f"label set {i} class {j} " + " ".join(["word"] * 40) for j in range(25)]
        return {"inputs": {"image": [_good_image()]}, "params": {"classes": classes, "templates": "none"}}

    for i in range(5):
        assert plain.post(huge_body).status_code == 400
        assert plain.post(distinct(i)).status_code == 200
    time.sleep(1)
    start = tree_rss_mb(plain.process.pid)
    for _ in range(100):
        response = plain.post(huge_body)
        assert response.status_code == 400 and len(response.text) < SHORT
    for i in range(300):
        assert plain.post(distinct(10 + i)).status_code == 200
    time.sleep(1)
    end = tree_rss_mb(plain.process.pid)
    assert end - start < 100, f"RSS went from {start:.0f} MB to {end:.0f} MB"


# --------------------------------------------------------------------------------------------
# Errors MLflow raises before the model runs


LARGE_IMAGE = _b64(np.random.default_rng(1).bytes(300_000))
MLFLOW_ERRORS = {  # requests MLflow's scoring server refuses itself, each carrying 300 KB of base64
    "a param of the wrong type": json.dumps({"inputs": {"image": [LARGE_IMAGE]}, "params": {"top_k": "three"}}),
    "columns of different lengths": json.dumps({"inputs": {"image": [LARGE_IMAGE] * 2, "text": ["a cat"]}}),
    "truncated JSON": json.dumps({"inputs": {"image": [LARGE_IMAGE]}})[:-3],
    "an unknown column": json.dumps({"dataframe_split": {"columns": ["picture"], "data": [[LARGE_IMAGE]]}}),
    "text that is not valid Unicode": '{"inputs": {"text": ["\\ud800 ' + LARGE_IMAGE + '"]}}',
}
ECHO_CASES_HEADING = "Errors MLflow's scoring server raises itself"


def _readme_row(case: str) -> str:
    """docs/limits.md's row for `case` in its table of errors MLflow raises itself."""
    section = (ROOT / "docs" / "limits.md").read_text().split(ECHO_CASES_HEADING, 1)[1]
    return next(line for line in section.splitlines() if line.startswith(f"| {case} "))


def _echoes(response: requests.Response) -> bool:
    return any(LARGE_IMAGE[at : at + 40] in response.text for at in range(0, 4000, 40))


@pytest.mark.parametrize("case", list(MLFLOW_ERRORS))
def test_the_guard_answers_mlflows_own_errors_without_echoes(guarded, case):
    body = MLFLOW_ERRORS[case]
    response = guarded.post(body)
    assert 400 <= response.status_code < 500, response.text[:300]
    assert len(response.text) < SHORT and not _echoes(response)
    assert "Traceback" not in response.text
    guarded.assert_serving()


@pytest.mark.parametrize("case", list(MLFLOW_ERRORS))
def test_the_readme_lists_exactly_the_cases_plain_mlflow_echoes(plain, case):
    """docs/limits.md names the errors that still echo the request on a plain `mlflow models serve`
    (MLflow raises them before the model is called); this keeps that list true."""
    body = MLFLOW_ERRORS[case]
    response = plain.post(body)
    assert 400 <= response.status_code < 600
    assert ("echoes the whole request" in _readme_row(case)) == _echoes(response), (case, response.text[:200])


def test_a_null_text_in_the_inputs_form(plain, guarded):
    """The guard refuses a `text` cell that is not a string. On the plain server MLflow casts a
    number to its text; a null it turned into the text "None" up to 3.17, and keeps as a null
    from 3.18, which the model then refuses. docs/limits.md says both of the plain server."""
    body = {"inputs": {"text": ["a cat", None, 5]}}
    response = guarded.post(body)
    assert response.status_code == 400
    assert "row 1: missing (null), not text; row 2: a int, not text" in response.json()["message"]
    assert plain.post({"inputs": {"text": ["a cat", 5]}}).status_code == 200
    response = plain.post(body)
    if Version(importlib.metadata.version("mlflow")) >= Version("3.18"):
        assert response.status_code == 400 and not _echoes(response)
        assert "row 1: missing (null), not text" in response.json()["message"]
    else:
        assert response.status_code == 200
    row = _readme_row("a null or a number in the `text` column")
    assert 'embedded as the text "5"' in row and "3.18" in row


def test_the_guard_caps_bodies_and_refuses_what_is_not_json(guarded):
    big = json.dumps({"inputs": {"image": [_b64(np.random.default_rng(2).bytes(4 * 1024 * 1024))]}})
    response = guarded.post(big)
    assert response.status_code == 413 and "MLFLOW_CLIP_MAX_BODY_BYTES" in response.json()["message"]
    assert guarded.post(b"PAR1" + b"\0" * 1000, content_type="application/x-parquet").status_code == 415
    nested = "[" * 100_000 + "]" * 100_000
    response = guarded.post(nested)
    assert response.status_code == 400 and "nests too deeply" in response.json()["message"]
    guarded.assert_serving()


def _data_uri_bodies() -> dict[str, dict]:
    uri = "data:image/png;base64," + _good_image()
    return {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[uri]]}},
        "dataframe_records": {"dataframe_records": [{"image": uri}]},
        "inputs": {"inputs": {"image": [uri]}},
        "instances": {"instances": [{"image": uri}]},
    }


def test_the_guard_decodes_data_uris_in_every_form(guarded):
    for form, body in _data_uri_bodies().items():
        response = guarded.post(body)
        assert response.status_code == 200, (form, response.text[:300])
        assert response.json()["predictions"][0]["label"] == "a red circle", form


def test_a_plain_server_takes_data_uris_where_the_readme_says(plain):
    """inputs and instances reach the model as text; MLflow base64-decodes the binary column of
    the dataframe forms itself and refuses a data URI there, as docs/serving.md states."""
    for form, body in _data_uri_bodies().items():
        response = plain.post(body)
        if form in ("inputs", "instances"):
            assert response.status_code == 200, (form, response.text[:300])
            assert response.json()["predictions"][0]["label"] == "a red circle", form
        else:
            assert response.status_code == 400 and "Incorrect padding" in response.text, (form, response.text[:300])
    page = " ".join((ROOT / "docs" / "serving.md").read_text().split())
    assert "through a plain `mlflow models serve` only in `inputs` and `instances`" in page


# --------------------------------------------------------------------------------------------
# The guard's process and its clients


def _good_clients_p95(server: Server, seconds: float, clients: int = 4) -> float:
    """The 95th percentile latency of `clients` clients sending one small image each, back to back."""
    body, latencies = json.dumps({"inputs": {"image": [_good_image()]}}), []

    def client() -> None:
        session, stop = requests.Session(), time.monotonic() + seconds
        while time.monotonic() < stop:
            started = time.perf_counter()
            response = session.post(
                server.url + "/invocations", data=body, headers={"Content-Type": "application/json"}
            )
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return float(np.percentile(latencies, 95))


def _send_headers_slowly(url: str, stop: threading.Event) -> None:
    """A client that sends its request headers one byte a second, and never finishes them."""
    host, port = url.removeprefix("http://").split(":")
    headers = f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nX-Slow: " + "a" * 100
    with socket.create_connection((host, int(port))) as connection:
        for byte in headers.encode():
            if stop.wait(1.0):
                return
            try:
                connection.sendall(bytes([byte]))
            except OSError:  # the server closed the connection
                return


def test_slow_clients_leave_good_clients_their_latency(guarded):
    """20 clients sending their headers one byte a second beside 4 good clients: the good
    clients' p95 latency stays within 2x of theirs alone, measured side by side (uvicorn's event
    loop holds a slow connection for the price of a socket)."""
    alone = _good_clients_p95(guarded, 6)
    stop = threading.Event()
    slow = [threading.Thread(target=_send_headers_slowly, args=(guarded.url, stop)) for _ in range(20)]
    for thread in slow:
        thread.start()
    try:
        time.sleep(2)  # all 20 connected and part-way through their headers
        beside = _good_clients_p95(guarded, 6)
    finally:
        stop.set()
        for thread in slow:
            thread.join()
    print(f"good clients' p95: {alone * 1000:.0f} ms alone, {beside * 1000:.0f} ms beside 20 slow clients")
    assert beside < 2 * alone, (alone, beside)


def _start_guard_piped(demo_model_dir: Path):
    """`mlflow-clip serve` with its output read through a pipe, as a script would read it."""
    import subprocess

    port = free_port()
    cli = str(Path(sys.executable).with_name("mlflow-clip"))
    argv = [cli, "serve", "-m", str(demo_model_dir), "-w", "1", "-h", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = threading.Thread(target=process.stdout.read)  # returns at end of file: when no process holds the pipe
    reader.start()
    wait_ready(f"http://127.0.0.1:{port}/ping", process)
    return process, reader, port


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_killing_the_guard_stops_its_server_and_frees_its_port(demo_model_dir, signal_name):
    """`kill` of `mlflow-clip serve` left its uvicorn server running, the port taken and a pipe
    reading its output open. SIGTERM (and SIGINT) is passed on; under SIGKILL, which cannot be,
    the server gets SIGTERM from the kernel as its parent dies."""
    import signal

    process, reader, port = _start_guard_piped(demo_model_dir)
    server = next(child for child in process_tree(process.pid) if child != process.pid)
    os.kill(process.pid, getattr(signal, signal_name))
    process.wait(timeout=10)
    reader.join(timeout=10)
    assert not reader.is_alive(), "a script reading the guard's output would still be waiting"
    process.stdout.close()
    stop = time.monotonic() + 10
    while time.monotonic() < stop and (Path(f"/proc/{server}").exists() or not _port_is_free(port)):
        time.sleep(0.2)
    assert not Path(f"/proc/{server}").exists() and _port_is_free(port)
    if signal_name == "SIGTERM":  # uvicorn shuts down, then ends by the signal it caught: 128 + 15
        assert process.returncode in (0, 128 + signal.SIGTERM)
