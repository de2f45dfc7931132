"""MLServer's runtime for mlflow-clip models: `"implementation": "mlflow_clip.mlserver.ClipRuntime"`.

MLServer (the server of KServe and Seldon Core) loads a model through the runtime class its
`model-settings.json` names. This one, shipped with mlflow-clip (install mlflow-clip next to
MLServer), serves an mlflow-clip model over the V2 (Open Inference) protocol:

- it downloads and checks the model with the installed mlflow-clip before any of the model's
  code runs (`download.download_verified`: every file against the manifest, and for a
  `models:/` URI the manifest against the registry's record), then loads it with
  `mlflow.pyfunc.load_model`, so the model's own, verified, code serves it;
- it answers with typed tensors (`tensors.py`): FP32 `[N, C]` probabilities, `[N, D]`
  embeddings, FP32 scores, BYTES only for text; its metadata lists every output;
- a parameter of the wrong type, an unknown input or a bad image is a 400 with a short message;
- with `"parameters": {"extra": {"max_batch_size": 16, "max_batch_time": 0.01}}` it batches
  concurrent requests itself, only those with the same parameters together (`batching.py`).
  MLServer's own adaptive batching (`max_batch_size` at the top of model-settings.json) gives all
  the requests it merges one set of parameters, so while it is on, requests that carry
  parameters are refused with a 400 naming this fix.

`extra` also takes `verify` (false: load without checking, with a warning) and `model_config`
(runtime settings and limits, as `mlflow.pyfunc.load_model(model_config=...)` takes them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from pathlib import Path
from typing import Any

from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import (
    InferenceRequest,
    InferenceResponse,
    MetadataModelResponse,
    MetadataTensor,
    Parameters,
    ResponseOutput,
)
from mlserver.utils import get_model_uri

from mlflow_clip.batching import BatchItem, ParameterSetBatcher, run_together
from mlflow_clip.serving.contract import CONFIG_FILE_NAME, FLAVOR_NAME
from mlflow_clip.tensors import RequestError, answer_tensors, metadata_tensors, model_params, read_request

_logger = logging.getLogger(__name__)

__all__ = ["ClipRuntime"]


class ClipRuntime(MLModel):
    """An mlflow-clip model served by MLServer: verified, typed, batched per parameter set."""

    async def load(self) -> bool:
        from mlflow_clip.download import download_verified

        extra = dict((self.settings.parameters.extra if self.settings.parameters else None) or {})
        uri = await _model_uri(self.settings)
        self._downloaded = download_verified(uri, verify=extra.get("verify"))
        loaded = await asyncio.to_thread(_load_pyfunc_model, self._downloaded.path, extra.get("model_config"))
        self._pyfunc, self._classes, self._embedding_dim, self._params = loaded
        inputs, outputs = metadata_tensors(len(self._classes), self._embedding_dim)
        self.inputs = [MetadataTensor(**tensor) for tensor in inputs]
        self.outputs = [MetadataTensor(**tensor) for tensor in outputs]
        self._batcher = _own_batcher(self._run_batch, extra)
        self._mlserver_batching = self.settings.max_batch_size > 1 and self.settings.max_batch_time > 0
        _logger.info(
            "mlflow-clip: model %r serves %s (checked before its code ran); batching: %s",
            self.name,
            self._downloaded.source,
            _describe_batching(self._batcher, self._mlserver_batching),
        )
        return True

    async def unload(self) -> bool:
        downloaded = getattr(self, "_downloaded", None)
        if downloaded is not None:
            downloaded.cleanup()
        return True

    async def metadata(self) -> MetadataModelResponse:
        metadata = await super().metadata()
        metadata.parameters = Parameters(params=self._params)  # the signature's parameters
        return metadata

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            item = read_request([_input(tensor) for tensor in payload.inputs], _parameters(payload))
            self._refuse_merged_parameters(item)
            if self._batcher is not None:
                out = await self._batcher.submit(item)
            else:
                out = await asyncio.to_thread(self._predict, item.frame, item.params)
            tensors = answer_tensors(out, self._widths(item.params))
        except RequestError as e:
            raise MLServerError(str(e), status_code=400) from None
        except Exception as e:
            status = _client_status(e)
            if status is None:
                raise
            raise MLServerError(getattr(e, "message", str(e)), status_code=status) from None
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[ResponseOutput(**tensor) for tensor in tensors],
        )

    def _predict(self, frame, params: dict[str, Any]):
        return self._pyfunc.predict(frame, params=params or None)

    def _run_batch(self, items: list[BatchItem]) -> list[Any]:
        return run_together(self._predict, items, lambda e: _client_status(e) == 400)

    def _refuse_merged_parameters(self, item: BatchItem) -> None:
        if not (self._mlserver_batching and item.params):
            return
        size, wait = self.settings.max_batch_size, self.settings.max_batch_time
        own = json.dumps({"parameters": {"extra": {"max_batch_size": size, "max_batch_time": wait}}})
        raise RequestError(
            f"This model has MLServer's adaptive batching on (max_batch_size {size}), which gives all the requests "
            f"it merges one set of parameters, so requests with parameters are refused (this one, or one batched "
            f"with it, sent {sorted(item.params)}). Send them to a model without it, or let mlflow-clip batch, per "
            f"parameter set: {own} in model-settings.json, instead of the top-level max_batch_size."
        )

    def _widths(self, params: dict[str, Any]) -> dict[str, int]:
        classes = len(params.get("classes") or []) or len(self._classes)
        top_k = min(int(params.get("top_k") or 0), classes)
        return {"probabilities": classes, "top_labels": top_k, "top_scores": top_k, "embedding": self._embedding_dim}


async def _model_uri(settings) -> str:
    """The model-settings `uri`: a URI with a scheme (models:/, runs:/, s3://) as it is, a path
    relative to the model-settings folder made absolute (MLServer's own rule)."""
    raw = (settings.parameters.uri if settings.parameters else None) or ""
    if urllib.parse.urlparse(raw).scheme not in ("", "file"):
        return raw
    return await get_model_uri(settings)


def _load_pyfunc_model(path: Path, model_config: dict | None):
    import mlflow

    model = mlflow.pyfunc.load_model(str(path), model_config=model_config)
    conf = model.metadata.flavors.get(FLAVOR_NAME) or {}
    config = json.loads((path / conf.get("config", CONFIG_FILE_NAME)).read_text(encoding="utf-8"))
    params = json.loads(model.metadata.signature.params.to_json()) if model.metadata.signature.params else []
    return model, list(conf.get("classes") or []), int(config.get("embedding_dim") or 0), params


def _own_batcher(run, extra: dict[str, Any]) -> ParameterSetBatcher | None:
    size, wait = extra.get("max_batch_size"), extra.get("max_batch_time", 0.01)
    if size in (None, 0, 1):
        return None
    try:
        return ParameterSetBatcher(run, size, wait)
    except ValueError as e:
        raise MLServerError(f"model-settings.json parameters.extra: {e}", status_code=422) from None


def _describe_batching(batcher: ParameterSetBatcher | None, mlserver_batching: bool) -> str:
    if batcher is not None:
        return f"per parameter set, up to {batcher.max_batch_size} requests or {batcher.max_batch_time * 1000:g} ms"
    if mlserver_batching:
        return "MLServer's adaptive batching (requests with parameters are refused)"
    return "off"


def _input(tensor) -> dict[str, Any]:
    data = tensor.data.root if hasattr(tensor.data, "root") else tensor.data
    if data and all(isinstance(row, list) for row in data):  # nested JSON rows: [["..."], ["..."]]
        data = [value for row in data for value in row]
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape, "data": data}


def _parameters(payload: InferenceRequest) -> dict[str, Any]:
    if payload.parameters is None:
        return {}
    return model_params(payload.parameters.model_dump(exclude_none=True))


def _client_status(error: BaseException) -> int | None:
    """The HTTP status MLflow's scoring server gives `error` (400 for bad input, 504 for a
    deadline), for MLflow's errors; None for any other exception (a 500)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.get_http_status_code()
    return None
