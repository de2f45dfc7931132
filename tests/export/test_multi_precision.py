"""precision=auto: one export gated at fp32, bf16 and int8, served at the fastest native precision.
(On a CPU where OpenVINO has no bf16, without AVX-512, auto gates fp32 and int8 and a list naming
bf16 is refused: the bf16 gates there would measure fp32.)

Tolerances: each precision's own parity gates (`ParityThresholds.for_precision`); a pinned fp32
serves the fp32 graph's exact outputs (1e-6 against a plain fp32 export of the same weights).
The demo model's int8 method is dynamic (a ViT), served on onnxruntime first.
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
    pytest.mark.slow,
    pytest.mark.skipif(not has_module("openvino"), reason='needs ".[openvino]"'),
]


# What auto gates on this CPU, in MULTI_PRECISIONS's order (False without OpenVINO).
AUTO = ("fp32", "bf16", "int8") if openvino_runs_bf16() else ("fp32", "int8")


def _export(name: str, precision: str, **kwargs):
    from mlflow_clip.demo_data import DEMO_CLASSES
    from mlflow_clip.export.job import export_and_register

    return export_and_register(
        list(DEMO_CLASSES), model="demo", templates="none", registered_model_name=name, precision=precision, **kwargs
    )


@pytest.fixture(scope="module")
def auto_export(module_store):
    return _export("clip-auto", "auto")


def tags_of(result) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_model_version("clip-auto", result.model_version).tags


def _images(count: int) -> list[bytes]:
    from mlflow_clip.demo_data import DEMO_CLASSES

    pairs = [(DEMO_CLASSES[i % len(DEMO_CLASSES)], "JPEG" if i % 2 else "PNG") for i in range(count)]
    return [data for data, _ in demo_image_bytes(pairs)]


def _probabilities(model, images) -> np.ndarray:
    return np.stack(model.predict(pd.DataFrame({"image": images}))["probabilities"].to_numpy())


def test_each_precision_is_gated_recorded_and_tagged(auto_export):
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    from mlflow_clip.export.spec import ParityThresholds
    from mlflow_clip.serving.variants import cpu_flags, int8_kernels

    flavor = Model.load(auto_export.model_uri).flavors["mlflow_clip"]
    table = flavor["precisions"]
    assert set(table) == set(AUTO) and flavor["precision"] == "fp32"  # MLmodel keeps its keys sorted
    assert flavor["runtime"]["runtime"] == "auto"
    if "bf16" in AUTO:
        assert table["bf16"]["onnx_model"] == "model.onnx" and table["bf16"]["runtimes"] == ["openvino"]
    assert table["int8"]["onnx_model"] == "model-int8.onnx" and table["int8"]["precision_method"] == "int8-dynamic"
    # Dynamic int8: onnxruntime first; OpenVINO's int8 kernels differ by CPU, and a runtime that
    # fails its gate on this one is refused (listed with the gate it failed), not served.
    int8 = table["int8"]
    assert [r for r in ("onnxruntime", "openvino") if r in int8["runtimes"] or r in int8.get("refused", {})] == [
        "onnxruntime",
        "openvino",
    ]
    assert int8["runtimes"][0] == "onnxruntime" and not set(int8["runtimes"]) & set(int8.get("refused", {}))
    assert int8["int8_kernels"] == int8_kernels(cpu_flags())  # what its gate vouches for
    assert "model-int8.onnx" in flavor["manifest"]["files"]
    metrics = MlflowClient().get_run(auto_export.run_id).data.metrics
    tags = tags_of(auto_export)
    for precision, entry in table.items():
        gates = ParityThresholds.for_precision(precision)
        for runtime in entry["runtimes"]:
            figures = entry["parity"][runtime]
            assert figures["max_abs_prob_diff"] == metrics[f"parity_{precision}_{runtime}_max_abs_prob_diff"]
            assert figures["max_abs_prob_diff"] <= gates.max_prob_diff
            assert figures["max_abs_logit_diff"] <= gates.max_logit_diff
            assert figures["top1_agreement"] >= gates.min_top1_agreement
        for runtime, reason in entry.get("refused", {}).items():
            assert reason.startswith(f"parity_{precision}_{runtime}_") and ("exceeds" in reason or "below" in reason)
            assert f"{runtime}: max prob diff" in tags[f"parity_{precision}"]
    if "bf16" in AUTO:
        assert 1e-5 < metrics["parity_bf16_openvino_max_abs_prob_diff"]  # bf16's rounding is real
    assert tags["precisions"] == ",".join(AUTO) and tags["precision"] == "fp32"
    assert tags["parity_int8"].startswith("onnxruntime: max prob diff ") and "(gates 1e-01, 0.9)" in tags["parity_int8"]
    from mlflow.artifacts import download_artifacts

    requirements = (download_artifacts(auto_export.model_uri) + "/requirements.txt").replace("//", "/")
    with open(requirements) as f:  # OpenVINO is required where a gated precision runs on it
        requires_openvino = any(line.startswith("openvino==") for line in f.read().splitlines())
    assert requires_openvino == any("openvino" in entry["runtimes"] for entry in table.values())


def test_it_serves_the_fastest_native_precision_and_says_why(auto_export, caplog):
    """int8, the fastest: native where the CPU has VNNI or AMX, and otherwise gated on this
    CPU's own int8 kernels, since the export ran here; but bf16 where the CPU has AMX's bf16,
    which outruns the demo's dynamic int8 graph (a ViT) there."""
    import mlflow
    from mlflow.models import Model

    from mlflow_clip.serving.variants import cpu_flags, int8_kernels, native_flags

    table = Model.load(auto_export.model_uri).flavors["mlflow_clip"]["precisions"]
    assert table["int8"]["precision_method"] == "int8-dynamic"
    expected = "bf16" if "bf16" in AUTO and "amx_bf16" in cpu_flags() else "int8"
    with caplog.at_level(logging.INFO, logger="mlflow_clip"):
        model = mlflow.pyfunc.load_model(f"models:/clip-auto/{auto_export.model_version}")
    assert model.get_raw_model().config.precision == expected
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("mlflow-clip: serving"))
    why = (
        "native on this CPU"
        if native_flags(expected, cpu_flags())
        else f"gated on this CPU's int8 kernels ({int8_kernels(cpu_flags())})"
    )
    assert f"precision {expected} on " in line and why in line
    labels = model.predict(pd.DataFrame({"image": _images(6)}))["label"]
    assert len(labels) == 6


def test_pinned_precisions_serve_what_was_gated_and_nothing_else(auto_export):
    import mlflow
    from mlflow.models import Model

    import mlflow_clip

    uri = f"models:/clip-auto/{auto_export.model_version}"
    images = _images(8)
    fp32 = mlflow.pyfunc.load_model(uri, model_config={"precision": "fp32"})
    assert fp32.get_raw_model().session.runtime == "onnxruntime"
    native = mlflow_clip.load_model(uri, model_config={"precision": "fp32"})  # the installed library's loader
    assert native.config.precision == "fp32" and native.session.runtime == "onnxruntime"
    np.testing.assert_allclose(
        _probabilities(fp32, images), np.stack(native.predict(images)["probabilities"].to_numpy()), atol=1e-6
    )
    gated = ", ".join(p for p in ("int8", "bf16", "fp32") if p in AUTO)
    if "bf16" in AUTO:
        bf16 = mlflow.pyfunc.load_model(uri, model_config={"precision": "bf16"})
        assert bf16.get_raw_model().session.description.endswith("(inference precision bf16)")
        np.testing.assert_allclose(_probabilities(bf16, images), _probabilities(fp32, images), atol=1e-2)
    else:
        with pytest.raises(Exception, match=f"precision='bf16'; this model was gated for {gated} only"):
            mlflow.pyfunc.load_model(uri, model_config={"precision": "bf16"})
    int8 = Model.load(auto_export.model_uri).flavors["mlflow_clip"]["precisions"]["int8"]
    if "openvino" in int8["runtimes"]:
        pinned = mlflow.pyfunc.load_model(uri, model_config={"precision": "int8", "runtime": "openvino"})
        assert pinned.get_raw_model().session.runtime == "openvino"
    else:  # refused at export on this CPU: pinning it is refused too
        refused = "int8 .gated on onnxruntime, not on runtime=openvino; refused there at export."
        with pytest.raises(Exception, match=refused):
            mlflow.pyfunc.load_model(uri, model_config={"precision": "int8", "runtime": "openvino"})
    with pytest.raises(Exception, match=f"precision='fp16'; this model was gated for {gated} only"):
        mlflow.pyfunc.load_model(uri, model_config={"precision": "fp16"})


def test_promotion_probe_compares_the_precision_it_served(auto_export):
    from mlflow.artifacts import download_artifacts

    from mlflow_clip.references import compare_with_reference, read_reference, run_probe

    path = download_artifacts(auto_export.model_uri)
    reference = read_reference(path)
    assert set(reference["variants"]) == set(AUTO) - {"fp32"}  # fp32, the model.onnx's, is the reference itself
    probe = run_probe(path, reference)
    assert probe["precision"] in ("int8", "bf16", "fp32")
    assert compare_with_reference(reference, probe, 1e-4) == []


def test_a_list_gates_only_those_and_a_failing_gate_registers_nothing(module_store, monkeypatch):
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    from mlflow_clip.export import spec
    from mlflow_clip.export.parity import ParityError

    if "bf16" in AUTO:
        pair = _export("clip-fp32-bf16", "fp32,bf16", text_encoder=False)
        assert set(Model.load(pair.model_uri).flavors["mlflow_clip"]["precisions"]) == {"fp32", "bf16"}
    else:  # refused before anything is built
        with pytest.raises(spec.SpecError, match="OpenVINO has no bf16 on this CPU"):
            _export("clip-fp32-bf16", "fp32,bf16", text_encoder=False)
        assert not MlflowClient().search_model_versions("name='clip-fp32-bf16'")
    monkeypatch.setitem(spec.PRECISION_THRESHOLDS, "int8", {**spec.PRECISION_THRESHOLDS["int8"], "max_prob_diff": 1e-7})
    with pytest.raises(ParityError, match="parity_int8_onnxruntime_max_abs_prob_diff = .* exceeds max_prob_diff"):
        _export("clip-int8-too-tight", "fp32,int8", text_encoder=False)
    assert not MlflowClient().search_model_versions("name='clip-int8-too-tight'")
