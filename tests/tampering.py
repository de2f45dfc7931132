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
