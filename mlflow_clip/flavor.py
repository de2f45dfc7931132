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
from typing import Any, Sequence

import yaml
from mlflow import pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.model_utils import _validate_and_copy_code_paths, _validate_and_prepare_target_save_path
from mlflow.utils.requirements_utils import _get_pinned_requirement
from mlflow.version import VERSION as MLFLOW_VERSION

from mlflow_clip.serving.classifier import ZeroShotClassifier
from mlflow_clip.serving.contract import (
    CONFIG_FILE_NAME,
    FLAVOR_NAME,
    MANIFEST_SHA256_TAG,
    ONNX_FILE_NAME,
    ONNX_SHA256_TAG,
    TEXT_ENCODER_FILE_NAME,
    VOCAB_FILE_NAME,
    VOCAB_LICENSE_FILE_NAME,
    ClassifierConfig,
    FlavorKey,
    sha256_bytes,
    sha256_file,
)
from mlflow_clip.serving.limits import InputLimits
from mlflow_clip.serving.loader import VERIFY_SETTING, ModelError, _load_pyfunc, default_signature, load_classifier
from mlflow_clip.serving.manifest import build_manifest, manifest_digest, read_mlmodel
from mlflow_clip.serving.runtime import RuntimeSettings

_logger = logging.getLogger(__name__)

SERVING_PACKAGE_PREFIX = "mlflow_clip_serving_"
# mlflow-skinny is MLflow without its data-science and tracking-server stack (pyarrow, scipy,
# scikit-learn, SQLAlchemy, Flask): enough to serve, with the scoring server's fastapi and uvicorn.
# It does not bring pandas or numpy, which mlflow.pyfunc and the serving code import.
SERVING_REQUIREMENTS = ("mlflow-skinny", "onnxruntime", "numpy", "pandas", "pillow", "ftfy", "regex")
# The optional runtime (`pip install "mlflow-clip[openvino]"`), required by models that run on it.
OPENVINO_REQUIREMENTS = ("openvino",)

__all__ = ["get_default_pip_requirements", "save_model", "log_model", "load_model", "_load_pyfunc"]


def get_default_pip_requirements(runtime: str = "onnxruntime") -> list[str]:
    """The serving requirements, pinned to the installed versions: mlflow-skinny, onnxruntime,
    numpy, pandas, Pillow, and the tokenizer's ftfy and regex; never torch, never full mlflow.
    The native resize needs none: the model carries it. A model whose runtime is `openvino`
    (bf16 models) also requires openvino."""
    names = SERVING_REQUIREMENTS + (OPENVINO_REQUIREMENTS if runtime == "openvino" else ())
    return [_pinned_requirement(name) for name in names]


def _pinned_requirement(name: str) -> str:
    if name == "mlflow-skinny":
        # The running MLflow's own version, which full mlflow pins its mlflow-skinny to; a source
        # install of MLflow has no mlflow-skinny distribution to read it from.
        return _get_pinned_requirement(name, version=MLFLOW_VERSION)
    return _get_pinned_requirement(name)


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
) -> None:
    """Save an ONNX classifier written by mlflow-clip's exporter as an MLflow model.

    `onnx_model` is the path of the `.onnx` file; its metadata (classes, normalization, input
    size) becomes the flavor configuration. `runtime` sets providers and thread counts,
    `limits` the per-request input limits; both can be overridden at load time.
    `text_encoder` is the exporter's text-encoder ONNX file: with it (and the tokenizer's
    vocabulary, copied alongside) the model also takes per-request labels and text input.
    """
    from mlflow_clip import references

    path = Path(path)
    config = ClassifierConfig.from_onnx(onnx_model)
    settings, input_limits = _as_settings(runtime), _as_limits(limits)
    for graph in (onnx_model, text_encoder):
        if graph is not None:
            refuse_external_data(graph)
    _validate_and_prepare_target_save_path(str(path))
    package, code_dir_subpath = _copy_code(path, code_paths)
    shutil.copyfile(onnx_model, path / ONNX_FILE_NAME)
    if text_encoder is not None:
        _copy_text_encoder(Path(text_encoder), path)
    config.write(path)
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, path / name)
    reference = references.write_reference(path, config, settings, text_encoder is not None)

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
        model_config=_overridable(settings, input_limits),
    )
    conf = _flavor_conf(config, settings, input_limits, path, text_encoder is not None)
    conf.update({FlavorKey.CODE: code_dir_subpath, FlavorKey.SERVING_PACKAGE: package, FlavorKey.REFERENCE: reference})
    mlflow_model.add_flavor(FLAVOR_NAME, **conf)
    _write_environment(path, conda_env, pip_requirements, extra_pip_requirements, settings)
    _save_with_manifest(mlflow_model, path)


def _save_with_manifest(mlflow_model: Model, path: Path) -> None:
    """Write MLmodel, then the manifest of the whole directory into it."""
    mlmodel_path = path / MLMODEL_FILE_NAME
    mlflow_model.save(str(mlmodel_path))
    manifest = build_manifest(path, read_mlmodel(path))
    mlflow_model.flavors[FLAVOR_NAME][FlavorKey.MANIFEST] = manifest
    mlflow_model.save(str(mlmodel_path))


def refuse_external_data(onnx_path: str | os.PathLike) -> None:
    """Refuse a graph whose weights live outside its own file: a model directory must be
    self-contained, and a reference outside it could read any file of the serving machine."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    external = [t.name for t in _all_tensors(model) if uses_external_data(t)]
    if external:
        raise ModelError(
            f"Received {Path(onnx_path).name} whose tensors {external[:3]} keep their data in side files; "
            "expected a self-contained graph. Save it with onnx.save_model(model, path, save_as_external_data=False).",
            error_code=INVALID_PARAMETER_VALUE,
        )


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def _overridable(settings: RuntimeSettings, limits: InputLimits) -> dict[str, Any]:
    runtime = {k: v for k, v in settings.to_dict().items() if k != "extra"}
    return {**runtime, **limits.to_dict(), VERIFY_SETTING: True}


def _as_settings(runtime: RuntimeSettings | dict | None) -> RuntimeSettings:
    if isinstance(runtime, RuntimeSettings):
        return runtime
    try:
        return RuntimeSettings.from_dict(runtime)
    except (TypeError, ValueError) as e:
        raise ModelError(str(e), error_code=INVALID_PARAMETER_VALUE) from e


def _as_limits(limits: InputLimits | dict | None) -> InputLimits:
    if isinstance(limits, InputLimits):
        return limits
    try:
        return InputLimits.from_dict(limits)
    except (TypeError, ValueError) as e:
        raise ModelError(str(e), error_code=INVALID_PARAMETER_VALUE) from e


def _copy_text_encoder(source: Path, path: Path) -> None:
    from mlflow_clip.package_data import default_vocab_license_path, default_vocab_path

    shutil.copyfile(source, path / TEXT_ENCODER_FILE_NAME)
    shutil.copyfile(default_vocab_path(), path / VOCAB_FILE_NAME)
    shutil.copyfile(default_vocab_license_path(), path / VOCAB_LICENSE_FILE_NAME)


def _text_conf(path: Path) -> dict[str, Any]:
    return {
        FlavorKey.TEXT_ENCODER: TEXT_ENCODER_FILE_NAME,
        FlavorKey.TEXT_ENCODER_SHA256: sha256_file(path / TEXT_ENCODER_FILE_NAME),
        FlavorKey.TOKENIZER_VOCAB: VOCAB_FILE_NAME,
        FlavorKey.TOKENIZER_VOCAB_SHA256: sha256_file(path / VOCAB_FILE_NAME),
    }


def _flavor_conf(config, settings, limits, path, has_text_encoder: bool) -> dict[str, Any]:
    from mlflow_clip.version import __version__

    return {
        **(_text_conf(path) if has_text_encoder else {}),
        "embedding_output": config.embedding_output,
        "context_length": config.context_length,
        FlavorKey.VERSION: __version__,
        FlavorKey.ONNX_MODEL: ONNX_FILE_NAME,
        FlavorKey.ONNX_SHA256: sha256_file(path / ONNX_FILE_NAME),
        FlavorKey.CONFIG: CONFIG_FILE_NAME,
        FlavorKey.CLASSES: list(config.classes),
        "templates": config.templates,
        FlavorKey.CLIP_MODEL: config.clip_model,
        "input_resolution": config.input_resolution,
        "mean": list(config.mean),
        "std": list(config.std),
        "logit_scale": config.logit_scale,
        "opset": config.opset,
        FlavorKey.PRECISION: config.precision,
        FlavorKey.PROVIDERS: list(settings.providers),
        FlavorKey.RUNTIME: settings.to_dict(),
        FlavorKey.LIMITS: limits.to_dict(),
    }


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


def _write_environment(path: Path, conda_env, pip_requirements, extra_pip_requirements, settings) -> None:
    if conda_env is None:
        default_reqs = None if pip_requirements is not None else get_default_pip_requirements(settings.runtime)
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
    `manifest_sha256`) from its creation, which promotion checks.
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
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        **kwargs,
    )
    if registered_model_name is not None:
        conf = info.flavors[FLAVOR_NAME]
        integrity = {
            ONNX_SHA256_TAG: conf[FlavorKey.ONNX_SHA256],
            MANIFEST_SHA256_TAG: manifest_digest(conf[FlavorKey.MANIFEST]),
        }
        version = mlflow.register_model(
            info.model_uri,
            registered_model_name,
            await_registration_for=await_registration_for,
            tags={**{k: str(v) for k, v in (tags or {}).items()}, **integrity},
        )
        info.registered_model_version = version.version
    return info


def load_model(model_uri: str, dst_path: str | None = None, model_config: dict | None = None) -> ZeroShotClassifier:
    """Load the native classifier (`.classes`, `.predict(images)`) from any MLflow model URI,
    checked against the model's manifest first (`model_config={"verify": False}` skips that)."""
    local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    return load_classifier(local_path, model_config)


def flavor_configuration(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The `mlflow_clip` flavor configuration of a local model directory."""
    conf = (read_mlmodel(model_dir).get("flavors") or {}).get(FLAVOR_NAME)
    if not isinstance(conf, dict):
        raise ModelError(f"{model_dir} is not an mlflow_clip model.", error_code=INVALID_PARAMETER_VALUE)
    return conf
