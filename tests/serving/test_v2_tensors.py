"""The V2 protocol's side of the MLServer runtime, without MLServer: requests read and checked,
answers as typed tensors, the metadata, and the batcher that never mixes parameters."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import encode, solid

from mlflow_clip.batching import BatchItem, ParameterSetBatcher, run_together
from mlflow_clip.tensors import RequestError, answer_tensors, metadata_tensors, model_params, read_request

RED, GREEN = encode(solid("red")), encode(solid("green"))


def _image_tensor(data, shape=None, name="image", datatype="BYTES"):
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def test_a_request_becomes_the_models_rows_and_its_own_parameters():
    mlserver_own = {"headers": {"x": "y"}, "content_type": "pd"}
    item = read_request([_image_tensor([RED, GREEN], [2, 1])], {"top_k": 2, **mlserver_own})
    assert list(item.frame.columns) == ["image"] and list(item.frame["image"]) == [RED, GREEN]
    assert item.params == {"top_k": 2} and item.rows == 2
    again = read_request([_image_tensor([GREEN])], {"content_type": "x", "top_k": 2})
    assert again.key == item.key  # MLServer's own parameters never split a batch
    assert read_request([_image_tensor([GREEN])], {"top_k": 3}).key != item.key
    text = read_request([_image_tensor([b"a red circle"], name="text")])
    assert list(text.frame["text"]) == ["a red circle"] and text.key != read_request([_image_tensor([RED])]).key
    assert model_params({"output": "label", "unknown": 1}) == {"output": "label"}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "expected one"),
        ([_image_tensor([RED]), _image_tensor(["a"], name="text")], "one kind per request"),
        ([_image_tensor([RED], name="picture")], "named 'picture'; expected 'image'"),
        ([_image_tensor([1.0], datatype="FP32")], "as 'FP32'; expected datatype BYTES"),
        ([_image_tensor([RED, GREEN], [3])], "expected shape [2] or [2, 1]"),
        ([_image_tensor([RED, GREEN], [1, 2])], "expected shape"),
    ],
)
def test_a_request_the_model_cannot_take_is_refused_saying_why(inputs, message):
    with pytest.raises(RequestError) as raised:
        read_request(inputs)
    assert message in str(raised.value) and len(str(raised.value)) < 400


def test_the_answer_is_typed_tensors_with_shapes_and_nan_for_a_failed_row(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    out = model.predict(pd.DataFrame({"image": [RED, b"junk", GREEN]}), params={"on_error": "null", "top_k": 2})
    tensors = {t["name"]: t for t in answer_tensors(out)}
    assert list(tensors) == ["label", "score", "probabilities", "top_labels", "top_scores", "error"]
    assert tensors["label"] == {"name": "label", "datatype": "BYTES", "shape": [3], "data": ["red", "", "green"]}
    assert tensors["probabilities"]["datatype"] == "FP32" and tensors["probabilities"]["shape"] == [3, 3]
    probabilities = np.asarray(tensors["probabilities"]["data"]).reshape(3, 3)
    np.testing.assert_array_equal(probabilities[[0, 2]], np.stack(out["probabilities"][[0, 2]]).astype(np.float32))
    assert np.isnan(probabilities[1]).all() and math.isnan(tensors["score"]["data"][1])
    assert tensors["top_labels"]["shape"] == [3, 2] and tensors["top_labels"]["data"][2:4] == ["", ""]
    assert tensors["error"]["data"][0] == "" and "not an image" in tensors["error"]["data"][1]
    labels = answer_tensors(model.predict(pd.DataFrame({"image": [GREEN]}), params={"output": "label"}))
    assert labels == [{"name": "label", "datatype": "BYTES", "shape": [1], "data": ["green"]}]


def test_an_answer_with_no_readable_row_keeps_the_declared_widths():
    out = pd.DataFrame({"embedding": [None, None], "error": ["bad", "bad"]})
    (embedding, error) = answer_tensors(out, {"embedding": 4})
    assert embedding["shape"] == [2, 4] and all(math.isnan(v) for v in embedding["data"])
    assert error["data"] == ["bad", "bad"]


def test_the_metadata_lists_every_output_with_its_type_and_shape():
    inputs, outputs = metadata_tensors(classes=9, embedding_dim=512)
    assert [(t["name"], t["datatype"]) for t in inputs] == [("image", "BYTES"), ("text", "BYTES")]
    shapes = {t["name"]: (t["datatype"], t["shape"]) for t in outputs}
    assert shapes == {
        "label": ("BYTES", [-1]),
        "score": ("FP32", [-1]),
        "probabilities": ("FP32", [-1, 9]),
        "top_labels": ("BYTES", [-1, -1]),
        "top_scores": ("FP32", [-1, -1]),
        "embedding": ("FP32", [-1, 512]),
        "error": ("BYTES", [-1]),
    }


def _is_client_error(error: BaseException) -> bool:
    return getattr(error, "get_http_status_code", lambda: 500)() == 400


def _item(images: list[bytes], **params) -> BatchItem:
    return read_request([_image_tensor(images)], params)


def test_a_batch_splits_its_answer_and_a_bad_request_in_it_fails_alone(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    calls = []

    def predict(frame, params):
        calls.append(len(frame))
        return model.predict(frame, params=params or None)

    first, second = run_together(predict, [_item([RED, GREEN]), _item([GREEN])], _is_client_error)
    assert list(first["label"]) == ["red", "green"] and list(second["label"]) == ["green"] and calls == [3]
    calls.clear()
    good, bad = run_together(predict, [_item([RED]), _item([GREEN, b"junk"])], _is_client_error)
    assert list(good["label"]) == ["red"] and calls == [3, 1, 2]  # the batch, then each alone
    assert "row 1: not an image" in bad.message  # its own row number, not the merged batch's


def test_the_batcher_never_puts_different_parameters_in_one_call(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))
    calls: list[tuple[int, str]] = []
    lock = threading.Lock()

    def run(items):
        with lock:
            calls.append((sum(i.rows for i in items), str(items[0].params)))
        return run_together(lambda f, p: model.predict(f, params=p or None), items, _is_client_error)

    batcher = ParameterSetBatcher(run, max_batch_size=4, max_batch_time=0.2)
    requests = [_item([RED]), _item([GREEN], output="label"), _item([GREEN]), _item([RED], output="label")]

    async def main():
        return await asyncio.gather(*(batcher.submit(item) for item in requests))

    plain_red, label_green, plain_green, label_red = asyncio.run(main())
    assert sorted(calls) == [(2, "{'output': 'label'}"), (2, "{}")]  # two calls, one per parameter set
    assert list(plain_red.columns) == ["label", "score", "probabilities", "error"]
    assert list(plain_red["label"]) == ["red"] and list(plain_green["label"]) == ["green"]
    assert isinstance(label_green, pd.Series) and list(label_green) == ["green"] and list(label_red) == ["red"]


def test_a_full_batch_runs_at_once_and_a_lone_request_waits_for_company(colour_model_dir):
    model = mlflow.pyfunc.load_model(str(colour_model_dir))

    def run(items):
        return run_together(lambda f, p: model.predict(f, params=p or None), items, _is_client_error)

    async def timed(batcher, items):
        started = time.monotonic()
        await asyncio.gather(*(batcher.submit(item) for item in items))
        return time.monotonic() - started

    waiting = 2.0
    assert asyncio.run(timed(ParameterSetBatcher(run, 2, waiting), [_item([RED]), _item([GREEN])])) < waiting
    assert asyncio.run(timed(ParameterSetBatcher(run, 2, 0.3), [_item([RED])])) >= 0.3
    with pytest.raises(ValueError, match="max_batch_size"):
        ParameterSetBatcher(run, 0, 0.1)
