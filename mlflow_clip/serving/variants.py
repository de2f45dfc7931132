"""Which precision a model gated at several serves here: the fastest one native on this CPU.

A model exported with ``-P precision=auto`` (or a list such as ``fp32,bf16``) carries a graph
per precision (bf16 runs the fp32 graph, compiled by OpenVINO at a bf16 hint; int8 has its own)
and the parity each one passed on each runtime that may serve it, in MLmodel's ``precisions``.
At load, `choose_variant` serves the fastest precision that is gated, native on this CPU and
whose runtime is installed, and says which and why (the load log). Fastest first, as measured
(docs/decisions/precision-choice.md): int8, bf16, fp32; on a CPU with AMX's bf16, bf16 before
a dynamic int8 graph (ViTs), which it outruns there. Native means:

- int8: VNNI (``avx512_vnni`` or ``avx_vnni``) or AMX (``amx_int8``), whose kernels sum
  uint8 x int8 products exactly. Elsewhere int8 runs on other kernels (1.7x to 1.85x fp32 on an
  AVX2-only CPU), whose pairwise products saturate at int16, so a gate passed on a VNNI CPU does
  not vouch for them. The export records the int8 kernels its gate ran on (``int8_kernels``:
  ``vnni``, ``avx512bw``, ``avx2`` or ``sse``, `int8_kernels`); int8 is also chosen where this
  CPU's kernels are the ones gated, such as a model exported and served on AVX2-only CPUs;
- bf16: ``avx512_bf16`` or AMX (``amx_bf16``); elsewhere OpenVINO emulates it at a fraction of
  fp32's speed; and OpenVINO installed (the only runtime here that computes in bf16);
- fp32: everywhere.

Each precision lists its runtimes in the order measured fastest for its tower (int8: OpenVINO
first for static QDQ graphs, onnxruntime first for dynamic ones; each gated at export).

Pinning: ``precision`` (``model_config={"precision": "bf16"}`` or ``MLFLOW_CLIP_PRECISION``)
serves that precision if the model was gated for it, native or not; ``runtime`` keeps the choice
to the precisions gated on that runtime. Nothing serves at a precision it was not gated for.

    >>> choose_variant(table, settings, saved).reason  # doctest: +SKIP
    'int8 on openvino: the fastest of the gated fp32, bf16, int8 native on this CPU (avx512_vnni)'
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import Any, Mapping

from .contract import ClassifierConfig
from .errors import SettingsError
from .openvino_runtime import OPENVINO_INSTALL_HINT, openvino_available
from .runtime import AUTO, OPENVINO, RuntimeSettings, RuntimeUnavailableError

_logger = logging.getLogger("mlflow_clip.serving.variants")

# Fastest first (docs/decisions/precision-choice.md has the figures).
SPEED_ORDER: tuple[str, ...] = ("int8", "bf16", "fp32")
# The int8 methods that bf16 outruns on CPUs with one of these flags: with AMX's bf16 tiles,
# OpenVINO's bf16 ran ViT-B/32 at 100.8 images/s on tensors against 81.5 for onnxruntime's dynamic
# int8 (pyfunc 65.2 against 56.9); static QDQ int8 (OpenVINO's own kernels) stays ahead of it.
BF16_BEFORE_INT8: dict[str, tuple[str, ...]] = {"int8-dynamic": ("amx_bf16",)}
# The CPU flags (as /proc/cpuinfo spells them) that make a precision native; fp32 needs none.
NATIVE_FLAGS: dict[str, tuple[str, ...]] = {
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8"),
    "bf16": ("avx512_bf16", "amx_bf16"),
}
# The families of int8 kernels onnxruntime and OpenVINO pick by CPU, best first: the flag that
# selects each. The products of `vnni` (VNNI or AMX) are exact; the others' saturate at int16,
# each on registers of its own width.
INT8_KERNEL_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vnni", NATIVE_FLAGS["int8"]),
    ("avx512bw", ("avx512bw",)),
    ("avx2", ("avx2",)),
)


class VariantKey:
    """The keys of one precision's entry in MLmodel's ``precisions``."""

    ONNX_MODEL = "onnx_model"
    ONNX_SHA256 = "onnx_sha256"
    METHOD = "precision_method"
    RUNTIMES = "runtimes"
    JPEG_DRAFT = "jpeg_draft"
    PARITY = "parity"
    REFUSED = "refused"  # runtime -> the gate it failed at export; it does not serve this precision
    INT8_KERNELS = "int8_kernels"  # int8: the kernel family of the CPU its gate ran on (`int8_kernels`)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them; empty where /proc/cpuinfo is not there."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def native_flags(precision: str, flags: frozenset[str]) -> list[str]:
    """The flags of `flags` that make `precision` native (["-"] for fp32, which needs none)."""
    needed = NATIVE_FLAGS.get(precision)
    return ["-"] if needed is None else [flag for flag in needed if flag in flags]


def int8_kernels(flags: frozenset[str]) -> str:
    """The family of int8 kernels a CPU with `flags` runs (see INT8_KERNEL_FAMILIES); ``sse``
    below AVX2."""
    return next((family for family, needed in INT8_KERNEL_FAMILIES if flags & set(needed)), "sse")


def int8_kernels_warning(config: ClassifierConfig, flags: frozenset[str] | None = None) -> str | None:
    """For an int8 model whose parity gate ran on another family of int8 kernels than this CPU's
    saturating ones, the warning to log at load; None otherwise (and for models that did not
    record the family)."""
    here = int8_kernels(cpu_flags() if flags is None else flags)
    if config.precision != "int8" or not config.int8_kernels or here in (config.int8_kernels, "vnni"):
        return None
    return (
        f"mlflow-clip: this int8 model was gated on {config.int8_kernels} int8 kernels; this CPU runs {here} "
        "kernels, whose products can saturate, so its probabilities may differ from fp32 PyTorch more than its "
        "gate measured. Serve it on a CPU with VNNI or AMX, or export it again on this kind of CPU."
    )


def _servable_here(precision: str, entry: Mapping[str, Any], flags: frozenset[str]) -> str:
    """Why `precision` may be chosen on this CPU without a pin (empty: it may not): the flags that
    make it native, or for int8, kernels of the family its gate ran on."""
    native = native_flags(precision, flags)
    if native:
        return f"native on this CPU ({', '.join(native)})"
    if precision == "int8" and entry.get(VariantKey.INT8_KERNELS) == int8_kernels(flags):
        return f"gated on this CPU's int8 kernels ({int8_kernels(flags)})"
    return ""


def _not_servable_why(precision: str, entry: Mapping[str, Any], flags: frozenset[str]) -> str:
    why = f"no {' or '.join(NATIVE_FLAGS[precision])}"
    if precision == "int8":
        gated_on = entry.get(VariantKey.INT8_KERNELS)
        why += f", and its gate ran on {gated_on} kernels, not {int8_kernels(flags)}" if gated_on else ""
    return f"{precision} (not native here: {why})"


@dataclass(frozen=True)
class Variant:
    """The precision chosen, the graph and runtime that serve it, and why (for the load log)."""

    precision: str
    onnx_model: str
    runtime: str
    method: str
    jpeg_draft: bool
    reason: str
    int8_kernels: str = ""

    def apply(
        self, settings: RuntimeSettings, saved: RuntimeSettings, config: ClassifierConfig
    ) -> tuple[RuntimeSettings, ClassifierConfig]:
        """`settings` and `config` serving this variant; a `jpeg_draft` set at load is kept."""
        draft = settings.jpeg_draft if settings.jpeg_draft != saved.jpeg_draft else self.jpeg_draft
        settings = replace(settings, runtime=self.runtime, precision=self.precision, jpeg_draft=draft)
        served = replace(config, precision=self.precision, precision_method=self.method, int8_kernels=self.int8_kernels)
        return settings, served


def choose_variant(
    table: Mapping[str, Mapping[str, Any]],
    settings: RuntimeSettings,
    flags: frozenset[str] | None = None,
    openvino: bool | None = None,
) -> Variant:
    """The variant of `table` (MLmodel's ``precisions``) to serve under `settings` (see the
    module docstring). Raises `SettingsError` (a ValueError) for a pinned precision the model was not gated for, and
    `RuntimeUnavailableError` when a pinned one needs a runtime not installed here."""
    flags = cpu_flags() if flags is None else flags
    openvino = openvino_available() if openvino is None else openvino
    if settings.precision and settings.precision not in table:
        listed = speed_order(table, frozenset())  # the same on every CPU
        raise SettingsError(
            f"Received precision={settings.precision!r}; this model was gated for {', '.join(listed)} only. "
            "Pin one of those, or leave precision out to serve the fastest one native here."
        )
    gated = speed_order(table, flags)
    pinned_runtime = None if settings.runtime == AUTO else settings.runtime
    skipped: list[str] = []
    for precision in [settings.precision] if settings.precision else gated:
        entry = table[precision]
        runtimes = [r for r in entry[VariantKey.RUNTIMES] if pinned_runtime in (None, r)]
        usable = [r for r in runtimes if r != OPENVINO or openvino]
        servable = _servable_here(precision, entry, flags)
        if not usable:
            why = _no_runtime(precision, entry, runtimes, pinned_runtime)
            if settings.precision:
                raise RuntimeUnavailableError(f"This model is pinned to {why}.")
            skipped.append(why)
        elif not servable and not settings.precision:
            skipped.append(_not_servable_why(precision, entry, flags))
        else:
            return _variant(precision, entry, usable[0], servable, gated, settings, skipped, flags)
    raise RuntimeUnavailableError(
        f"No precision this model was gated for can be served here: {'; '.join(skipped)}. "
        f"{OPENVINO_INSTALL_HINT}, or pin runtime and precision to a pair the model was gated for."
    )


def speed_order(table: Mapping[str, Mapping[str, Any]], flags: frozenset[str]) -> list[str]:
    """The precisions of `table`, fastest first on a CPU with `flags` (`SPEED_ORDER`, with bf16
    before an int8 graph whose method it outruns there: `BF16_BEFORE_INT8`)."""
    order = [p for p in SPEED_ORDER if p in table] + [p for p in table if p not in SPEED_ORDER]
    if "int8" in table and "bf16" in table:
        if flags & set(BF16_BEFORE_INT8.get(table["int8"].get(VariantKey.METHOD, ""), ())):
            order.remove("bf16")
            order.insert(order.index("int8"), "bf16")
    return order


def _no_runtime(precision: str, entry: Mapping[str, Any], runtimes: list[str], pinned: str | None) -> str:
    if not runtimes:
        refused = "; refused there at export" if pinned in entry.get(VariantKey.REFUSED, {}) else ""
        return f"{precision} (gated on {', '.join(entry[VariantKey.RUNTIMES])}, not on runtime={pinned}{refused})"
    return f"{precision} (needs OpenVINO, not installed here: {OPENVINO_INSTALL_HINT})"


def _variant(precision, entry, runtime, servable, gated, settings, skipped, flags) -> Variant:
    if settings.precision:
        why = f"pinned (precision={precision})"
        if not servable and precision == "int8":
            gated_on = entry.get(VariantKey.INT8_KERNELS)
            why += f"; gated on {gated_on} int8 kernels, this CPU runs" if gated_on else "; this CPU runs"
            why += f" {int8_kernels(flags)}: its products can saturate"
        elif not servable:
            why += "; not native on this CPU, expect it slow"
    else:
        why = f"the fastest of the gated {', '.join(gated)} {servable}"
    if skipped:
        why += "; passed over: " + "; ".join(skipped)
    return Variant(
        precision=precision,
        onnx_model=entry[VariantKey.ONNX_MODEL],
        runtime=runtime,
        method=entry.get(VariantKey.METHOD, ""),
        jpeg_draft=bool(entry.get(VariantKey.JPEG_DRAFT, False)),
        reason=f"{precision} on {runtime}: {why}",
        int8_kernels=str(entry.get(VariantKey.INT8_KERNELS, "")),
    )
