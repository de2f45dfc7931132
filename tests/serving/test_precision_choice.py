"""mlflow_clip.serving.variants: the fastest gated precision native on the CPU, pinnable, never
one that was not gated. The CPU's flags and OpenVINO's presence are passed in, so each kind of
machine is tested here whatever this one is."""

from __future__ import annotations

import pytest

from mlflow_clip.serving.runtime import AUTO, RuntimeSettings, RuntimeUnavailableError
from mlflow_clip.serving.variants import choose_variant, cpu_flags

TABLE = {
    "fp32": {"onnx_model": "model.onnx", "runtimes": ["onnxruntime", "openvino"], "jpeg_draft": False},
    "bf16": {
        "onnx_model": "model.onnx",
        "runtimes": ["openvino"],
        "jpeg_draft": True,
        "precision_method": "openvino-bf16-hint",
    },
    "int8": {
        "onnx_model": "model-int8.onnx",
        "runtimes": ["openvino", "onnxruntime"],
        "jpeg_draft": True,
        "precision_method": "int8-static-qdq",
    },
}
ZEN4 = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})  # this project's machines
SAPPHIRE_RAPIDS = frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"})
SKYLAKE = frozenset({"avx2", "avx512f"})  # AVX-512, no VNNI, no bf16
AUTO_SETTINGS = RuntimeSettings(runtime=AUTO)


def test_the_fastest_native_precision_is_served_and_the_log_says_why():
    variant = choose_variant(TABLE, AUTO_SETTINGS, ZEN4, openvino=True)
    assert (variant.precision, variant.runtime, variant.onnx_model) == ("int8", "openvino", "model-int8.onnx")
    assert variant.reason.startswith("int8 on openvino: the fastest of the gated int8, bf16, fp32 native on this CPU")
    assert "avx512_vnni" in variant.reason
    assert choose_variant(TABLE, AUTO_SETTINGS, SAPPHIRE_RAPIDS, openvino=True).precision == "int8"


def test_bf16_goes_before_a_dynamic_int8_graph_where_the_cpu_has_amx_bf16():
    dynamic = {**TABLE, "int8": {**TABLE["int8"], "precision_method": "int8-dynamic", "runtimes": ["onnxruntime"]}}
    variant = choose_variant(dynamic, AUTO_SETTINGS, SAPPHIRE_RAPIDS, openvino=True)
    assert (variant.precision, variant.runtime) == ("bf16", "openvino")
    assert variant.reason.startswith("bf16 on openvino: the fastest of the gated bf16, int8, fp32 native")
    # without AMX, and for static QDQ graphs (OpenVINO's int8 kernels), int8 stays first
    assert choose_variant(dynamic, AUTO_SETTINGS, ZEN4, openvino=True).precision == "int8"
    assert choose_variant(TABLE, AUTO_SETTINGS, SAPPHIRE_RAPIDS, openvino=True).precision == "int8"
    # without OpenVINO, bf16 is passed over and the dynamic int8 graph serves
    assert choose_variant(dynamic, AUTO_SETTINGS, SAPPHIRE_RAPIDS, openvino=False).precision == "int8"


def test_bf16_only_where_it_is_native_and_openvino_is_installed():
    table = {k: TABLE[k] for k in ("fp32", "bf16")}
    assert choose_variant(table, AUTO_SETTINGS, ZEN4, openvino=True).precision == "bf16"
    on_skylake = choose_variant(table, AUTO_SETTINGS, SKYLAKE, openvino=True)
    assert on_skylake.precision == "fp32" and on_skylake.runtime == "onnxruntime"
    assert "bf16 (not native here: no avx512_bf16 or amx_bf16)" in on_skylake.reason
    without_openvino = choose_variant(table, AUTO_SETTINGS, ZEN4, openvino=False)
    assert without_openvino.precision == "fp32" and "needs OpenVINO" in without_openvino.reason


def test_int8_falls_back_to_its_other_gated_runtime_without_openvino():
    variant = choose_variant(TABLE, AUTO_SETTINGS, ZEN4, openvino=False)
    assert (variant.precision, variant.runtime) == ("int8", "onnxruntime")


def test_a_pinned_precision_is_served_even_where_not_native():
    variant = choose_variant(TABLE, RuntimeSettings(runtime=AUTO, precision="bf16"), SKYLAKE, openvino=True)
    assert variant.precision == "bf16" and "pinned (precision=bf16); not native on this CPU" in variant.reason
    fp32 = choose_variant(TABLE, RuntimeSettings(runtime=AUTO, precision="fp32"), ZEN4, openvino=True)
    assert (fp32.precision, fp32.runtime, fp32.jpeg_draft) == ("fp32", "onnxruntime", False)


def test_nothing_serves_at_a_precision_it_was_not_gated_for():
    table = {k: TABLE[k] for k in ("fp32", "bf16")}
    with pytest.raises(ValueError, match=r"precision='int8'; this model was gated for bf16, fp32 only"):
        choose_variant(table, RuntimeSettings(runtime=AUTO, precision="int8"), ZEN4, openvino=True)
    with pytest.raises(RuntimeUnavailableError, match="pinned to bf16 .needs OpenVINO"):
        choose_variant(table, RuntimeSettings(runtime=AUTO, precision="bf16"), ZEN4, openvino=False)


def test_a_pinned_runtime_keeps_the_choice_to_what_was_gated_on_it():
    variant = choose_variant(TABLE, RuntimeSettings(runtime="onnxruntime"), ZEN4, openvino=True)
    assert (variant.precision, variant.runtime) == ("int8", "onnxruntime")
    with pytest.raises(RuntimeUnavailableError, match="gated on openvino, not on runtime=onnxruntime"):
        choose_variant(TABLE, RuntimeSettings(runtime="onnxruntime", precision="bf16"), ZEN4, openvino=True)


def test_apply_keeps_a_jpeg_draft_set_at_load():
    saved = RuntimeSettings(runtime=AUTO)
    variant = choose_variant(TABLE, AUTO_SETTINGS, ZEN4, openvino=True)
    from mlflow_clip.serving.contract import ClassifierConfig

    config = ClassifierConfig(
        classes=["a"], clip_model="x", input_resolution=224, mean=[0] * 3, std=[1] * 3, logit_scale=1
    )
    settings, served = variant.apply(saved, saved, config)
    assert settings.jpeg_draft and settings.runtime == "openvino" and served.precision == "int8"
    assert served.precision_method == "int8-static-qdq"
    settings, _ = variant.apply(RuntimeSettings(runtime=AUTO, jpeg_draft=True), RuntimeSettings(runtime=AUTO), config)
    assert settings.jpeg_draft
    pinned_off = RuntimeSettings(runtime=AUTO, jpeg_draft=False)
    settings, _ = variant.apply(pinned_off, RuntimeSettings(runtime=AUTO, jpeg_draft=True), config)
    assert not settings.jpeg_draft


def test_this_machines_flags_are_read():
    flags = cpu_flags()
    assert isinstance(flags, frozenset) and ("fpu" in flags or not flags)


def test_a_runtime_refused_at_export_is_never_served_and_the_pin_says_so():
    table = {**TABLE, "int8": {**TABLE["int8"], "runtimes": ["onnxruntime"], "refused": {"openvino": "off"}}}
    assert choose_variant(table, AUTO_SETTINGS, ZEN4, openvino=True).runtime == "onnxruntime"
    pinned = RuntimeSettings(runtime="openvino", precision="int8")
    with pytest.raises(RuntimeUnavailableError, match=r"int8 \(gated on onnxruntime, not on runtime=openvino; refused"):
        choose_variant(table, pinned, ZEN4, openvino=True)


ZEN3 = frozenset({"avx", "avx2", "fma"})  # AVX2 only: int8 kernels with saturating products


def test_int8_kernel_families_follow_the_flags_that_select_them():
    from mlflow_clip.serving.variants import int8_kernels

    assert [int8_kernels(f) for f in (ZEN4, SAPPHIRE_RAPIDS, SKYLAKE | {"avx512bw"}, ZEN3, frozenset())] == [
        "vnni",
        "vnni",
        "avx512bw",
        "avx2",
        "sse",
    ]
    assert int8_kernels(ZEN3 | {"avx_vnni"}) == "vnni"


def test_int8_is_chosen_without_vnni_only_where_its_gate_ran_on_the_same_kernels():
    """A gate passed on AVX2 kernels vouches for AVX2 kernels; one passed on VNNI does not (nor
    does a model saved before the kernels were recorded)."""
    table = {k: TABLE[k] for k in ("fp32", "int8")}
    on_avx2 = {**table, "int8": {**table["int8"], "int8_kernels": "avx2"}}
    variant = choose_variant(on_avx2, AUTO_SETTINGS, ZEN3, openvino=True)
    assert variant.precision == "int8" and "gated on this CPU's int8 kernels (avx2)" in variant.reason
    on_vnni = {**table, "int8": {**table["int8"], "int8_kernels": "vnni"}}
    for gated in (on_vnni, table):
        variant = choose_variant(gated, AUTO_SETTINGS, ZEN3, openvino=True)
        assert variant.precision == "fp32" and "int8 (not native here: no avx512_vnni" in variant.reason
    assert (
        "its gate ran on vnni kernels, not avx2" in choose_variant(on_vnni, AUTO_SETTINGS, ZEN3, openvino=True).reason
    )
    # On VNNI the products are exact, whatever kernels the gate ran on.
    assert choose_variant(on_avx2, AUTO_SETTINGS, ZEN4, openvino=True).precision == "int8"
    pinned = choose_variant(on_vnni, RuntimeSettings(runtime=AUTO, precision="int8"), ZEN3, openvino=True)
    assert pinned.precision == "int8" and "gated on vnni int8 kernels, this CPU runs avx2" in pinned.reason


def test_an_int8_model_gated_on_other_kernels_than_this_cpus_is_warned_about():
    from mlflow_clip.serving.contract import ClassifierConfig
    from mlflow_clip.serving.variants import int8_kernels_warning

    def config(precision="int8", kernels="vnni"):
        return ClassifierConfig(
            classes=["a"], clip_model="x", input_resolution=224, mean=[0] * 3, std=[1] * 3, logit_scale=1,
            precision=precision, int8_kernels=kernels,
        )  # fmt: skip

    warning = int8_kernels_warning(config(), ZEN3)
    assert "gated on vnni int8 kernels; this CPU runs avx2 kernels, whose products can saturate" in warning
    assert "export it again on this kind of CPU" in warning
    assert int8_kernels_warning(config(kernels="avx2"), ZEN3) is None  # the kernels its gate ran on
    assert int8_kernels_warning(config(kernels="avx2"), ZEN4) is None  # exact products
    assert int8_kernels_warning(config(kernels=""), ZEN3) is None  # saved before the family was recorded
    assert int8_kernels_warning(config(precision="fp32", kernels=""), ZEN3) is None
    pinned = choose_variant(
        {"int8": {**TABLE["int8"], "int8_kernels": "vnni"}}, RuntimeSettings(runtime=AUTO, precision="int8"), ZEN3
    )
    _, served = pinned.apply(AUTO_SETTINGS, AUTO_SETTINGS, config(precision="fp32", kernels=""))
    assert served.int8_kernels == "vnni" and int8_kernels_warning(served, ZEN3)
