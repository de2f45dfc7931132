"""docs/kserve.md's resources: parsed, checked against each other and the project, and (slow)
against KServe's own Python models, in an environment of their own with the `kserve` package."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT

PAGE = (ROOT / "docs" / "kserve.md").read_text(encoding="utf-8")
RESOURCES = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", PAGE, flags=re.S)]
DOCKERFILE = re.search(r"```dockerfile\n(.*?)```", PAGE, flags=re.S).group(1)
RUNTIME = next(r for r in RESOURCES if r["kind"] == "ServingRuntime")
SERVICES = [r for r in RESOURCES if r["kind"] == "InferenceService"]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_the_page_holds_a_runtime_and_the_services_it_serves():
    assert [r["kind"] for r in RESOURCES].count("ServingRuntime") == 1 and len(SERVICES) == 2
    assert RUNTIME["apiVersion"] == "serving.kserve.io/v1alpha1"
    formats = {f["name"] for f in RUNTIME["spec"]["supportedModelFormats"]}
    assert "v2" in RUNTIME["spec"]["protocolVersions"]
    for service in SERVICES:
        model = service["spec"]["predictor"]["model"]
        assert service["apiVersion"] == "serving.kserve.io/v1beta1"
        assert model["runtime"] == RUNTIME["metadata"]["name"] and model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] == "v2"
        # the model comes from storage KServe downloads, or from the registry the runtime reads itself
        registry = _env(model).get("MLSERVER_MODEL_URI", "")
        assert ("storageUri" in model) != registry.startswith("models:/")
        assert not registry or "MLFLOW_TRACKING_URI" in _env(model)


def test_the_runtime_runs_the_projects_mlserver_class_on_the_port_it_opens():
    (container,) = RUNTIME["spec"]["containers"]
    env = _env(container)
    module, _, name = env["MLSERVER_MODEL_IMPLEMENTATION"].rpartition(".")
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8")  # mlserver itself is not here
    assert name in {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef)}
    assert env["MLSERVER_MODEL_URI"] == "/mnt/models"  # where KServe's storage initializer puts the model
    assert [p["containerPort"] for p in container["ports"]] == [int(env["MLSERVER_HTTP_PORT"])]
    assert env["MLSERVER_DEBUG"] == "false"  # no stack traces to clients


def test_the_image_installs_what_the_mlserver_page_installs():
    assert DOCKERFILE.startswith("FROM python:3.11")
    for package in ("mlserver", '"uvloop<0.22"', "mlflow-clip", "-r /tmp/model-requirements.txt"):
        assert package in DOCKERFILE
    assert '"uvloop<0.22"' in (ROOT / "docs" / "mlserver.md").read_text(encoding="utf-8")
    assert "USER 1000" in DOCKERFILE  # not root


# Builds each resource as KServe's (and Kubernetes') generated model classes, field by field:
# an unknown field, a value of the wrong type or a missing required field is an error.
STRICT_BUILD = r"""
import json, re, sys
import kserve.models, kubernetes.client.models

def build(kind, value, path):
    if kind in ("str", "int", "bool", "float"):
        expected = {"str": str, "int": int, "bool": bool, "float": (int, float)}[kind]
        if not isinstance(value, expected):
            raise TypeError(f"{path}: {value!r} is not {kind}")
        return value
    if kind == "object":
        return value
    if kind.lower().startswith("list["):
        if not isinstance(value, list):
            raise TypeError(f"{path}: expected a list")
        return [build(kind[5:-1], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if kind.lower().startswith(("dict(", "dict[")):
        inner = re.match(r"dict[(\[]str, (.*)[)\]]", kind, flags=re.I).group(1)
        return {k: build(inner, v, f"{path}.{k}") for k, v in value.items()}
    cls = getattr(kserve.models, kind, None) or getattr(kubernetes.client.models, kind)
    if not isinstance(value, dict):
        raise TypeError(f"{path}: expected an object ({kind})")
    fields = {camel: attr for attr, camel in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise KeyError(f"{path}: {kind} has no field {unknown}")
    return cls(**{fields[k]: build(cls.openapi_types[fields[k]], v, f"{path}.{k}") for k, v in value.items()})

errors = []
for resource in json.load(sys.stdin):
    kind = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}[resource["kind"]]
    try:
        build(kind, resource, resource["kind"])
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
print(json.dumps(errors))
"""


@pytest.mark.slow
def test_every_resource_is_what_kserves_own_models_accept(tmp_path):
    """`kserve` changes pandas and uvloop, so it gets a uv environment of its own (as MLServer
    does); each resource is built with its generated model classes."""
    from benchmarks.mlserver import find_uv

    uv = find_uv()
    if uv is None:
        pytest.skip("the kserve environment is built with uv, which is not installed here: pip install uv")
    env = tmp_path / "kserve-env"
    python = env / "bin" / "python"
    for command in (
        [uv, "venv", "-q", "--python", sys.executable, str(env)],
        [uv, "pip", "install", "-q", "--python", str(python), "kserve"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"the kserve package did not install here: {done.stderr.strip()[-300:]}")
    check = subprocess.run(
        [str(python), "-c", STRICT_BUILD], input=json.dumps(RESOURCES), capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert json.loads(check.stdout) == []
    broken = json.loads(json.dumps(RESOURCES))
    broken[-1]["spec"]["predictor"]["model"]["storageUrl"] = "s3://typo"  # a misspelt field must be caught
    check = subprocess.run(
        [str(python), "-c", STRICT_BUILD], input=json.dumps(broken), capture_output=True, text=True, timeout=300
    )
    assert "has no field ['storageUrl']" in check.stdout, check.stdout + check.stderr[-1000:]
