"""Serving: everything a model carries and runs (onnxruntime, numpy, Pillow; never torch).

`save_model` copies this package whole into each model's `code/` folder under a name of its own
(`mlflow_clip_serving_<digest of its files>`), so a served model runs exactly the code it was
saved with, and that copy never takes the place of the installed `mlflow_clip`. Every import
inside is relative for that reason, and nothing here imports `mlflow_clip` itself. Nothing is
imported lazily either: two models with the same serving code share one copy in `sys.modules`,
and the first one's directory may be gone (a temporary download) by the time the second loads.

    contract.py    file names, MLmodel keys, graph names, the classifier config, the hash
    manifest.py    the SHA-256 of every file that decides a prediction, and its check
    bytecode.py    which bytecode caches under `code/` are provably their verified source's
    integrity.py   a model's copy imports only verified source: the check before any of it runs
    loader.py      the pyfunc loader MLflow calls, and the pyfunc wrapper
    signature.py   the signature: inputs, parameters, and every output each request returns
    v2.py          the output table and errors as `mlserver_mlflow`'s pandas codec takes them
    classifier.py  rows in, predictions out
    rows.py        a request's rows and parameters, checked
    images.py      decoding untrusted image bytes
    decode.py      header checks, pixel budgets and the decode itself
    structure.py   what a file's decoders will walk (parts, scans, image data), read from its bytes
    cost.py        the CPU a decode will cost, estimated before it starts
    deadline.py    the request's deadline, checked between pieces of work
    preprocess.py  CLIP's resize, crop and normalization (native or Pillow, same pixels)
    resample.py    the binding to the native extension
    runtime.py     the runtime settings, the runtime choice and the onnxruntime session
    openvino_runtime.py   the optional OpenVINO session (imported only when chosen; bf16)
    limits.py      per-request input limits
    prompts.py, tokenizer.py, text.py   labels, CLIP's tokenizer and text encoder
    text_tokenizers.py   other tokenizers (SigLIP's, multilingual), served by tokenizers or sentencepiece
    errors.py      the error family's root, and how an error names a value
"""

import sys

VERIFY_ENV = "MLFLOW_CLIP_VERIFY"  # "0" turns every check of a model off (loader.py reads it too)


def _protect_model_copy() -> None:
    """In a model's copy (imported by MLflow from the model's `code/`), check `integrity.py`
    against the manifest and let it check the rest before any other module of the package runs
    (see integrity.py). The installed `mlflow_clip.serving` is trusted as installed."""
    import os

    package_dir = os.path.dirname(os.path.realpath(__file__))
    code_dir = os.path.dirname(package_dir)
    saved = sys.path[:]
    outside = [p for p in saved if os.path.realpath(p or os.curdir) != code_dir]
    sys.path[:] = outside  # what the check imports must not come from the folder it checks
    try:
        import logging

        if os.environ.get(VERIFY_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
            logging.getLogger(__name__).warning("mlflow-clip: %s runs unchecked (%s=0).", __name__, VERIFY_ENV)
        else:
            _check_and_protect(package_dir, os.path.dirname(code_dir))
    except BaseException:
        sys.path[:] = outside  # a refused model's code stays off the path
        raise
    sys.path[:] = saved


def _check_and_protect(package_dir: str, model_dir: str) -> None:
    import hashlib
    import os
    import types

    import yaml

    path = os.path.join(package_dir, "integrity.py")
    try:
        with open(os.path.join(model_dir, "MLmodel"), encoding="utf-8") as file:
            mlmodel = yaml.safe_load(file)
        expected = mlmodel["flavors"]["mlflow_clip"]["manifest"]["files"][f"code/{__name__}/integrity.py"]
        with open(path, "rb") as file:
            source = file.read()
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise ImportError(f"{__name__} is not in a model directory with a manifest ({type(e).__name__}: {e})") from None
    if hashlib.sha256(source).hexdigest() != expected:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_STATE

        raise MlflowException(
            f"The model at {model_dir} does not match the manifest written when it was saved: "
            f"code/{__name__}/integrity.py changed. Load the version as it was registered (download it again), "
            "or, if you edited it on purpose, set MLFLOW_CLIP_VERIFY=0.",
            error_code=INVALID_STATE,
        )
    integrity = types.ModuleType(f"{__name__}.integrity")
    integrity.__file__ = path
    sys.modules[integrity.__name__] = integrity
    exec(compile(source, path, "exec", dont_inherit=True), integrity.__dict__)
    integrity.protect(__name__, package_dir, model_dir, mlmodel)


if __name__ != "mlflow_clip.serving":
    _protect_model_copy()
