"""Ways to tamper with a saved model directory, each returning what verification must report."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import yaml
from helpers import encode, solid

from mlflow_clip.serving.manifest import read_mlmodel


def package(model: Path) -> str:
    return read_mlmodel(model)["flavors"]["mlflow_clip"]["serving_package"]


def swap_classes(model: Path) -> str:
    config = json.loads((model / "clip_classifier.json").read_text())
    config["classes"][0], config["classes"][-1] = config["classes"][-1], config["classes"][0]
    (model / "clip_classifier.json").write_text(json.dumps(config))
    return "clip_classifier.json changed"


def raise_limits(model: Path) -> str:
    mlmodel = read_mlmodel(model)
    mlmodel["flavors"]["python_function"]["config"]["max_rows"] = 10_001
    mlmodel["flavors"]["mlflow_clip"]["limits"]["max_rows"] = 10_001
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return "MLmodel changed"


def edit_code(model: Path) -> str:
    path = model / "code" / package(model) / "classifier.py"
    path.write_text(path.read_text() + "\nIMAGE_COLUMN = 'image'  # an innocent-looking line\n")
    return f"code/{package(model)}/classifier.py changed"


def add_code(model: Path) -> str:
    (model / "code" / package(model) / "sitecustomize.py").write_text("print('hello')\n")
    return f"code/{package(model)}/sitecustomize.py added"


def negate_text_encoder(model: Path) -> str:
    import onnx
    from onnx import helper

    graph_model = onnx.load(str(model / "text_encoder.onnx"))
    graph = graph_model.graph
    output = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_raw" if o == output else o for o in node.output]
    graph.node.append(helper.make_node("Neg", [f"{output}_raw"], [output]))
    onnx.save(graph_model, str(model / "text_encoder.onnx"))
    return "text_encoder.onnx changed"


def swap_merges(model: Path) -> str:
    path = model / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode().split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    return "bpe_simple_vocab_16e6.txt.gz changed"


def remove_graph(model: Path) -> str:
    (model / "model.onnx").unlink()
    return "model.onnx missing"


def replace_reference_image(model: Path) -> str:
    target = sorted((model / "reference").glob("*.png"))[0]
    target.write_bytes(encode(solid("blue")))
    return f"reference/{target.name} changed"


TAMPERING = {
    "swapped classes": swap_classes,
    "raised limits in MLmodel": raise_limits,
    "a line added to the serving code": edit_code,
    "a module added to the serving code": add_code,
    "a negated text encoder": negate_text_encoder,
    "swapped merges in the vocabulary": swap_merges,
    "a missing graph": remove_graph,
    "a replaced reference image": replace_reference_image,
}


# Code that must never run: each injection writes `marker` when (if) Python runs it.


def _payload(marker: Path) -> str:
    return f"\nopen({str(marker)!r}, 'w').write('the injected code ran')\n"


def inject_code(model: Path, marker: Path) -> str:
    path = model / "code" / package(model) / "classifier.py"
    path.write_text(path.read_text() + _payload(marker))
    return f"code/{package(model)}/classifier.py changed"


def drop_unchecked_pyc(model: Path, marker: Path) -> str:
    """An unchecked hash-based .pyc (PEP 552) of classifier.py plus the payload: Python would
    run it in place of the (unchanged) source."""
    import py_compile
    import sys

    source = model / "code" / package(model) / "classifier.py"
    forged = source.with_name("forged.py")
    forged.write_text(source.read_text() + _payload(marker))
    name = f"__pycache__/classifier.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(
        str(forged), cfile=str(source.parent / name), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH
    )
    forged.unlink()
    return f"code/{package(model)}/{name} added"


def shadow_a_library(model: Path, marker: Path) -> str:
    """A module at the top of code/, which MLflow puts first on sys.path: it would replace the
    real onnxruntime for everything imported after it."""
    (model / "code" / "onnxruntime.py").write_text(_payload(marker))
    return "code/onnxruntime.py added"


def recompute_manifest(model: Path) -> None:
    """Rewrite the manifest inside MLmodel to match the directory as it now is: what an attacker
    who can write the artifact store does after changing a file."""
    from mlflow_clip.serving.manifest import build_manifest

    mlmodel = read_mlmodel(model)
    mlmodel["flavors"]["mlflow_clip"].pop("manifest")
    mlmodel["flavors"]["mlflow_clip"]["manifest"] = build_manifest(model, mlmodel)
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def inject_code_and_recompute(model: Path, marker: Path) -> str:
    inject_code(model, marker)
    recompute_manifest(model)
    return "the manifest in MLmodel differs from"


def raise_max_pixels_and_recompute(model: Path, marker: Path) -> str:
    mlmodel = read_mlmodel(model)
    for limits in (mlmodel["flavors"]["mlflow_clip"]["limits"], mlmodel["flavors"]["python_function"]["config"]):
        limits["max_pixels"] = limits["max_pixels"] * 100
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    recompute_manifest(model)
    return "the manifest in MLmodel differs from"


# Each self-check catches these; the recomputed ones need the registry's pin.
INJECTIONS = {
    "a line added to a module": inject_code,
    "an unchecked hash-based .pyc": drop_unchecked_pyc,
    "a module that shadows a library": shadow_a_library,
}
PINNED_ONLY = {
    "code edited, the manifest recomputed": inject_code_and_recompute,
    "max_pixels x100, the manifest recomputed": raise_max_pixels_and_recompute,
}
