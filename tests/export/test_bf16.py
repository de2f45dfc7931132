"""precision=bf16: the fp32 graph served by OpenVINO with a bf16 inference precision hint.

Tolerances: the bf16 parity gates (`ParityThresholds.for_precision("bf16")`: probabilities 1e-2,
logits 0.3, top-1 agreement 0.9); on fresh demo images, accuracy within 0.5 point of fp32 and
top-1 agreement with fp32 PyTorch >= 99%.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from helpers import demo_image_bytes, has_module, requires_export

from mlflow_clip.serving.openvino_runtime import openvino_runs_bf16

pytestmark = [
    requires_export,
    pytest.mark.skipif(not has_module("openvino"), reason='needs ".[openvino]"'),
    pytest.mark.skipif(
        has_module("openvino") and not openvino_runs_bf16(),
        reason="OpenVINO has no bf16 on this CPU (no AVX-512): the export refuses bf16 here "
        "(tests/export/test_preflight.py)",
    ),
]

MAX_ACCURACY_DROP = 0.005
MIN_AGREEMENT = 0.99


def _export(name: str, **kwargs):
    from mlflow_clip.demo_data import DEMO_CLASSES
    from mlflow_clip.export.job import export_and_register

    return export_and_register(
        list(DEMO_CLASSES), model="demo", templates="ensemble", registered_model_name=name, precision="bf16", **kwargs
    )


@pytest.fixture(scope="module")
def bf16_export(module_store):
    return _export("clip-bf16", text_encoder=False)


def test_bf16_export_is_tagged_logged_and_gated(bf16_export):
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    from mlflow_clip.export.parity import ParityThresholds

    client = MlflowClient()
    gates = ParityThresholds.for_precision("bf16")
    version = client.get_model_version("clip-bf16", bf16_export.model_version)
    assert version.tags["precision"] == "bf16" and version.tags["parity_status"] == "passed"
    run = client.get_run(bf16_export.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["precision"] == "bf16" and params["precision_method"] == "openvino-bf16-hint"
    assert params["bf16_runtime"] == "openvino" and params["bf16_inference_precision_hint"] == "bf16"
    assert float(params["max_prob_diff"]) == gates.max_prob_diff == 1e-2
    assert float(params["max_logit_diff"]) == gates.max_logit_diff == 0.3
    # bf16 rounding is real (not a silent fp32 run) and within the gates
    assert 1e-5 < metrics["parity_max_abs_prob_diff"] <= gates.max_prob_diff
    assert 1e-3 < metrics["parity_max_abs_logit_diff"] <= gates.max_logit_diff
    assert metrics["parity_top1_agreement"] >= gates.min_top1_agreement and metrics["parity_max_abs_pixel_diff"] == 0.0
    flavor = Model.load(bf16_export.model_uri).flavors["mlflow_clip"]
    assert flavor["precision"] == "bf16" and flavor["runtime"]["runtime"] == "openvino"


def test_bf16_model_loads_through_pyfunc_and_predicts_true_labels(bf16_export, caplog):
    import mlflow

    with caplog.at_level(logging.INFO, logger="mlflow_clip"):
        model = mlflow.pyfunc.load_model(bf16_export.model_uri)
    assert "runtime OpenVINO" in caplog.text and "inference precision bf16" in caplog.text
    samples = demo_image_bytes([(c, "PNG") for c in _classes()])
    out = model.predict(pd.DataFrame({"image": [data for data, _ in samples]}))
    assert list(out["label"]) == [name for _, name in samples]


def test_bf16_accuracy_is_within_half_a_point_of_fp32(bf16_export, demo_model_dir):
    import mlflow_clip

    images, truth = _fresh_demo_images()
    bf16 = np.array(mlflow_clip.load_model(bf16_export.model_uri).predict(images)["probabilities"].tolist())
    fp32 = np.array(mlflow_clip.load_model(str(demo_model_dir)).predict(images)["probabilities"].tolist())
    accuracy_bf16, accuracy_fp32 = float((bf16.argmax(1) == truth).mean()), float((fp32.argmax(1) == truth).mean())
    assert accuracy_fp32 >= 0.95
    assert accuracy_bf16 >= accuracy_fp32 - MAX_ACCURACY_DROP, (accuracy_bf16, accuracy_fp32)
    assert float((bf16.argmax(1) == fp32.argmax(1)).mean()) >= MIN_AGREEMENT
    assert 0 < np.abs(bf16 - fp32).max() <= 0.1  # bf16 rounding shows, well below a label's margin


def test_too_tight_bf16_gate_fails_the_export_and_registers_nothing(module_store):
    from mlflow.tracking import MlflowClient

    from mlflow_clip.export.parity import ParityError, ParityThresholds

    thresholds = ParityThresholds.for_precision("bf16", max_prob_diff=1e-6)
    with pytest.raises(ParityError, match=r"parity_max_abs_prob_diff = .* exceeds max_prob_diff = 1e-06"):
        _export("clip-bf16-refused", thresholds=thresholds, text_encoder=False)
    client = MlflowClient()
    assert client.search_model_versions("name='clip-bf16-refused'") == []
    failed = client.search_runs(["0"], "params.registered_model_name = 'clip-bf16-refused'")
    assert [r.info.status for r in failed] == ["FAILED"] and failed[0].data.tags["parity_status"] == "failed"


def test_bf16_gates_sit_between_fp16_and_int8():
    from mlflow_clip.export.parity import ParityThresholds

    fp16, bf16, int8 = (ParityThresholds.for_precision(p) for p in ("fp16", "bf16", "int8"))
    assert fp16.max_prob_diff <= bf16.max_prob_diff < int8.max_prob_diff
    assert fp16.max_logit_diff < bf16.max_logit_diff < int8.max_logit_diff


def _fresh_demo_images(count: int = 270, seed: int = 2027):
    """`count` drawn demo images (sizes 40-700 px, PNG and JPEG) and their true class indices."""
    from helpers import encode

    from mlflow_clip.demo_data import DEMO_CLASSES, draw_image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        _, colour, shape = DEMO_CLASSES[i % 9].split()
        size = (int(rng.integers(40, 700)), int(rng.integers(40, 700)))
        images.append(encode(draw_image(colour, shape, size=size, rng=rng), "PNG" if i % 2 else "JPEG"))
    return images, np.arange(count) % 9


def _classes() -> list[str]:
    from mlflow_clip.demo_data import DEMO_CLASSES

    return list(DEMO_CLASSES)
