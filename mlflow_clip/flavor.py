"""The `mlflow_clip` MLflow flavor: a torch-free pyfunc that serves CLIP zero-shot ONNX models.

The model directory is the contract. `save_model` writes everything serving needs (the ONNX
graph, `clip_classifier.json` with classes, normalization and input size, the runtime settings
in MLmodel, reference images with the predictions they must give, the serving code under
`code/` with the native resize's source and binary) and a manifest of all of it; the loader reads it
back, checked against that manifest.

Which code serves a model is one rule: MLflow's loaders (`mlflow.pyfunc.load_model`,
`mlflow models serve`, `spark_udf`, MLServer) run the model's own copy of `mlflow_clip.serving`,
imported under a name of its own; this module's `load_model` runs the installed library on the
model's files. Neither depends on what was imported first.

    >>> import mlflow_clip
    >>> mlflow_clip.save_model("model.onnx", "clip_model")  # doctest: +SKIP
    >>> classifier = mlflow_clip.load_model("clip_model")  # doctest: +SKIP
    >>> classifier.predict([open("cat.jpg", "rb").read()])["label"][0]  # doctest: +SKIP
    'a cat'
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from mlflow import pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import get_total_file_size, write_to
from mlflow.utils.model_utils import _validate_and_copy_code_paths, _validate_and_prepare_target_save_path
from mlflow.utils.requirements_utils import _get_pinned_requirement
from mlflow.version import VERSION as MLFLOW_VERSION

from mlflow_clip.download import download_model
from mlflow_clip.model_io import (
    as_limits,
    as_settings,
    checked_precisions,
    copy_text_encoder,
    flavor_conf,
    overridable_settings,
    refuse_external_data,
    save_with_manifest,
)
from mlflow_clip.serving.classifier import ZeroShotClassifier
from mlflow_clip.serving.contract import (
    FLAVOR_NAME,
    MANIFEST_SHA256_TAG,
    ONNX_FILE_NAME,
    ONNX_SHA256_TAG,
    ClassifierConfig,
    FlavorKey,
    sha256_bytes,
)
from mlflow_clip.serving.limits import InputLimits
from mlflow_clip.serving.loader import ModelError, _load_pyfunc, load_classifier
from mlflow_clip.serving.manifest import manifest_digest, read_mlmodel
from mlflow_clip.serving.runtime import RuntimeSettings
from mlflow_clip.serving.signature import default_signature
from mlflow_clip.serving.text_tokenizers import SENTENCEPIECE, TOKENIZERS

_logger = logging.getLogger(__name__)

SERVING_PACKAGE_PREFIX = "mlflow_clip_serving_"
# mlflow-skinny is MLflow without its data-science and tracking-server stack (pyarrow, scipy,
# scikit-learn, SQLAlchemy, Flask): enough to serve, with the scoring server's fastapi and uvicorn.
# It does not bring pandas or numpy, which mlflow.pyfunc and the serving code import.
# simplejpeg decodes baseline JPEGs to Pillow's exact pixels in about half the time (checked at
# load; without it, Pillow decodes them: docs/decisions/jpeg-decoder.md).
SERVING_REQUIREMENTS = ("mlflow-skinny", "onnxruntime", "numpy", "pandas", "pillow", "simplejpeg", "ftfy", "regex")
# The optional runtime (`pip install "mlflow-clip[openvino]"`), required by models that run on it.
OPENVINO_REQUIREMENTS = ("openvino",)
# The library serving a tokenizer other than CLIP's, required by the models that carry one
# (mlflow_clip.serving.text_tokenizers; CLIP's own tokenizer needs only ftfy and regex).
TOKENIZER_REQUIREMENTS = {TOKENIZERS: ("tokenizers",), SENTENCEPIECE: ("sentencepiece",)}
# Models that run on a GPU require the GPU build of onnxruntime instead of the CPU one (both
# install the module `onnxruntime`, so an environment has one or the other).
GPU_RUNTIME_PACKAGE = "onnxruntime-gpu"
GPU_RUNTIME_FLOOR = "onnxruntime-gpu>=1.20"  # the onnxruntime release setup.py requires
GPU_PRECISIONS = ("fp16",)
GPU_PROVIDER_PREFIXES = ("CUDA", "Tensorrt")

__all__ = ["get_default_pip_requirements", "save_model", "log_model", "load_model", "_load_pyfunc"]


def get_default_pip_requirements(
    runtime: str = "onnxruntime", tokenizer: str = "clip", providers: Sequence[str] = (), precision: str = "fp32"
) -> list[str]:
    """The serving requirements, pinned to the installed versions: mlflow-skinny, onnxruntime,
    numpy, pandas, Pillow, simplejpeg, and the tokenizer's ftfy and regex; never torch, never full mlflow.
    The native resize needs none: the model carries it. A model whose runtime is `openvino`
    (bf16 models) also requires openvino; one whose tokenizer is not CLIP's, the library that
    serves it (`tokenizers` or `sentencepiece`). An fp16 model, or one that asks for CUDA or
    TensorRT (`providers`), requires `onnxruntime-gpu` instead of `onnxruntime` (`uses_gpu`)."""
    names = SERVING_REQUIREMENTS + (OPENVINO_REQUIREMENTS if runtime == "openvino" else ())
    names += TOKENIZER_REQUIREMENTS.get(tokenizer, ())
    if uses_gpu(providers, precision):
        return [_gpu_runtime_requirement() if name == "onnxruntime" else _pinned_requirement(name) for name in names]
    return [_pinned_requirement(name) for name in names]


def uses_gpu(providers: Sequence[str] = (), precision: str = "fp32") -> bool:
    """True for an fp16 model (a GPU precision: on a CPU it runs slower than fp32) and for a model
    that asks for a CUDA or TensorRT execution provider, which only `onnxruntime-gpu` has."""
    return precision in GPU_PRECISIONS or any(p.startswith(GPU_PROVIDER_PREFIXES) for p in providers)


def _gpu_runtime_requirement() -> str:
    """`onnxruntime-gpu`, pinned when it is installed here; otherwise from the release this
    package's serving install requires: the GPU build's releases trail the CPU build's (the
    index had onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1), so the CPU version is no pin for it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{GPU_RUNTIME_PACKAGE}=={version(GPU_RUNTIME_PACKAGE)}"
    except PackageNotFoundError:
        _logger.info("%s is not installed here to pin: the model requires %s", GPU_RUNTIME_PACKAGE, GPU_RUNTIME_FLOOR)
        return GPU_RUNTIME_FLOOR


def _pinned_requirement(name: str) -> str:
    if name == "mlflow-skinny":
        # The running MLflow's own version, which full mlflow pins its mlflow-skinny to; a source
        # install of MLflow has no mlflow-skinny distribution to read it from.
        return _get_pinned_requirement(name, version=MLFLOW_VERSION)
    try:
        return _get_pinned_requirement(name)
    except ImportError:  # ModuleNotFoundError, and importlib's PackageNotFoundError (an ImportError too)
        # A model saved for another environment (an OpenVINO runtime, say, saved where OpenVINO is
        # not installed): its requirement cannot be pinned to a version found here.
        _logger.warning("%s is not installed here: the model requires it unpinned.", name)
        return name


def get_default_conda_env() -> dict:
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def save_model(
    onnx_model: str | os.PathLike,
    path: str | os.PathLike,
    conda_env: dict | str | None = None,
    code_paths: Sequence[str] | None = None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    pip_requirements: Sequence[str] | str | None = None,
    extra_pip_requirements: Sequence[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    runtime: RuntimeSettings | dict | None = None,
    limits: InputLimits | dict | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer_files: Sequence[str | os.PathLike] | None = None,
    precisions: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Save an ONNX classifier written by mlflow-clip's exporter as an MLflow model, as MLflow's
    own flavors do: the environment arguments are checked first, then the files are copied, the
    MLmodel is written with its manifest, then the environment files.

    Args:
        onnx_model: the `.onnx` file the exporter wrote; its metadata (classes, normalization,
            input size) becomes the flavor configuration.
        path: the model directory to create (it must not exist, or be empty).
        conda_env, code_paths, mlflow_model, signature, input_example, pip_requirements,
            extra_pip_requirements, metadata: as in MLflow's built-in flavors; `signature`
            defaults to every input and output the model takes and returns.
        runtime: `RuntimeSettings` (or its dict): providers and thread counts, overridable at load.
        limits: `InputLimits` (or its dict): the per-request input limits, overridable at load.
        extra_files: `{name: path}` of further files copied into the model (and its manifest).
        text_encoder: the exporter's text-encoder ONNX file: with it (and the tokenizer's
            vocabulary, copied alongside) the model also takes per-request labels and text input.
        tokenizer_files: the exporter's tokenizer files for a tokenizer other than CLIP's (the
            contract's `tokenizer`: `tokenizer.json`, or `sentencepiece.json` with its `spiece.model`).
        precisions: the exporter's table of the precisions the model was gated at, each one's
            graph (`model.onnx` or a file of `extra_files`), runtimes and parity
            (`mlflow_clip.export.variants`): the model then serves the fastest one native where it loads.
    """
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    from mlflow_clip import references

    path = Path(path)
    config = ClassifierConfig.from_onnx(onnx_model)
    settings, input_limits = as_settings(runtime), as_limits(limits)
    for graph in (onnx_model, text_encoder):
        if graph is not None:
            refuse_external_data(graph)
    _validate_and_prepare_target_save_path(str(path))
    package, code_dir_subpath = _copy_code(path, code_paths)
    shutil.copyfile(onnx_model, path / ONNX_FILE_NAME)
    if text_encoder is not None:
        copy_text_encoder(Path(text_encoder), path, config, tokenizer_files)
    config.write(path)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, path / name)
    precisions = checked_precisions(path, precisions)
    reference = references.write_reference(path, config, settings, text_encoder is not None, precisions)

    mlflow_model = mlflow_model or Model()
    mlflow_model.signature = signature if signature is not None else default_signature()
    if input_example is not None:
        _save_example(mlflow_model, input_example, str(path))
    if metadata is not None:
        mlflow_model.metadata = metadata
    pyfunc.add_to_model(
        mlflow_model,
        loader_module=f"{package}.loader",
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        code=code_dir_subpath,
        # The settings an operator may override at load time (`model_config=` or the
        # MLFLOW_PYFUNC_INFERENCE_CONFIG environment variable of `mlflow models serve`).
        model_config=overridable_settings(settings, input_limits),
    )
    conf = flavor_conf(config, settings, input_limits, path, text_encoder is not None)
    conf.update({FlavorKey.CODE: code_dir_subpath, FlavorKey.SERVING_PACKAGE: package, FlavorKey.REFERENCE: reference})
    if precisions:
        conf[FlavorKey.PRECISIONS] = precisions
    mlflow_model.add_flavor(FLAVOR_NAME, **conf)
    needs_openvino = any("openvino" in entry["runtimes"] for entry in (precisions or {}).values())
    requirements_runtime = "openvino" if needs_openvino else settings.runtime
    _write_environment(
        path, conda_env, pip_requirements, extra_pip_requirements, requirements_runtime, settings, config
    )
    if size := get_total_file_size(str(path)):
        mlflow_model.model_size_bytes = size
    save_with_manifest(mlflow_model, path)


def log_model(
    onnx_model: str | os.PathLike,
    artifact_path: str | None = None,
    conda_env: dict | str | None = None,
    code_paths: Sequence[str] | None = None,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    await_registration_for: int = 300,
    pip_requirements: Sequence[str] | str | None = None,
    extra_pip_requirements: Sequence[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    runtime: RuntimeSettings | dict | None = None,
    limits: InputLimits | dict | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer_files: Sequence[str | os.PathLike] | None = None,
    precisions: Mapping[str, Mapping[str, Any]] | None = None,
    name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_type: str | None = None,
    step: int = 0,
    model_id: str | None = None,
    **kwargs: Any,
):
    """Log an mlflow-clip ONNX classifier as an MLflow model (and register it if asked).

    The arguments are those of MLflow 3's built-in flavors (`name`; `artifact_path`, deprecated
    by MLflow; `params`, `tags`, `model_type`, `step`, `model_id` for the logged model) plus
    `save_model`'s. A registered version carries the model's integrity tags (`onnx_sha256`,
    `manifest_sha256`) from its creation, which promotion and mlflow-clip's loads check; so
    does the logged model.
    Returns MLflow's `ModelInfo`; `.registered_model_version` is set when registered.
    """
    import mlflow

    import mlflow_clip.flavor

    info = Model.log(
        artifact_path=artifact_path,
        name=name if name is not None or artifact_path is not None else "model",
        flavor=mlflow_clip.flavor,
        onnx_model=onnx_model,
        conda_env=conda_env,
        code_paths=code_paths,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        metadata=metadata,
        runtime=runtime,
        limits=limits,
        extra_files=extra_files,
        text_encoder=text_encoder,
        tokenizer_files=tokenizer_files,
        precisions=precisions,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        **kwargs,
    )
    conf = info.flavors[FLAVOR_NAME]
    integrity = {
        ONNX_SHA256_TAG: conf[FlavorKey.ONNX_SHA256],
        MANIFEST_SHA256_TAG: manifest_digest(conf[FlavorKey.MANIFEST]),
    }
    if getattr(info, "model_id", None):  # MLflow 3's logged model pins its manifest too (models:/m-<id>)
        mlflow.MlflowClient().set_logged_model_tags(info.model_id, integrity)
    if registered_model_name is not None:
        version = mlflow.register_model(
            info.model_uri,
            registered_model_name,
            await_registration_for=await_registration_for,
            tags={**{k: str(v) for k, v in (tags or {}).items()}, **integrity},
        )
        info.registered_model_version = version.version
    return info


def load_model(model_uri: str, dst_path: str | None = None, model_config: dict | None = None) -> ZeroShotClassifier:
    """Load the native classifier (`.classes`, `.predict(images)`) from any MLflow model URI.

    It runs the installed library on the model's files, never the model's own code, after
    checking them against the model's manifest, and, for a registered version (`models:/name/3`,
    `models:/name@alias`, resolved once) or a logged model, the manifest against the digest the
    registry recorded when it was created (`model_config={"verify": False}` skips both). A URI
    that names nothing raises `mlflow_clip.download.ModelNotFoundError`.
    """
    model = download_model(model_uri, dst_path)
    return load_classifier(model.path, model_config, model.pinned)


def flavor_configuration(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The `mlflow_clip` flavor configuration of a local model directory."""
    conf = (read_mlmodel(model_dir).get("flavors") or {}).get(FLAVOR_NAME)
    if not isinstance(conf, dict):
        raise ModelError(f"{model_dir} is not an mlflow_clip model.", error_code=INVALID_PARAMETER_VALUE)
    return conf


def serving_package_dir() -> Path:
    import mlflow_clip.serving

    return Path(mlflow_clip.serving.__file__).resolve().parent


def serving_package_files() -> list[Path]:
    """What a model carries of the serving package: its modules, the native resize's C source,
    and the native resize as built for this interpreter (when it is)."""
    source = serving_package_dir()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return sorted([*source.glob("*.py"), *source.glob("*.c"), *source.glob(f"_mlflow_clip_resample{suffix}")])


def serving_package_name() -> str:
    """`mlflow_clip_serving_<12 hex>`: named by the digest of the serving code (its Python and C
    sources), so two models with different serving code can be served in one process, each by
    its own."""
    digest = hashlib.sha256()
    for file in serving_package_files():
        if file.suffix in (".py", ".c"):
            digest.update(file.name.encode() + b"\0" + sha256_bytes(file.read_bytes()).encode() + b"\n")
    return SERVING_PACKAGE_PREFIX + digest.hexdigest()[:12]


def _copy_code(path: Path, code_paths: Sequence[str] | None) -> tuple[str, str]:
    package = serving_package_name()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / package
        staged.mkdir()
        for file in serving_package_files():
            shutil.copyfile(file, staged / file.name)
        return package, _validate_and_copy_code_paths([str(staged), *(code_paths or [])], str(path))


def _write_environment(
    path: Path, conda_env, pip_requirements, extra_pip_requirements, runtime: str, settings: RuntimeSettings, config
) -> None:
    if conda_env is None:
        default_reqs = (
            None
            if pip_requirements is not None
            else get_default_pip_requirements(runtime, config.tokenizer, settings.providers, config.precision)
        )
        conda_env, pip_reqs, constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_reqs, constraints = _process_conda_env(conda_env)
    with open(path / _CONDA_ENV_FILE_NAME, "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        write_to(str(path / _CONSTRAINTS_FILE_NAME), "\n".join(constraints))
    write_to(str(path / _REQUIREMENTS_FILE_NAME), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(str(path / _PYTHON_ENV_FILE_NAME))
