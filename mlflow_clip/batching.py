"""Adaptive batching that never mixes parameters: concurrent requests with the same parameters
run as one call of the model, each getting back its own rows.

MLServer's own adaptive batcher merges the requests it gathers into one and keeps one set of
parameters for all of them (the last request's win), so a client's `classes` or `output` would
apply to its neighbours' images. This batcher keys every request by its parameters (and its
kind: images or texts): only requests with equal keys share a call. A request waits at most
`max_batch_time` seconds for company, and a batch holds at most `max_batch_size` requests.

If a batch fails because of one request's input (a bad image with `on_error="raise"`), each of
its requests runs again alone, so each gets its own answer or its own error, with row numbers
of its own, never a neighbour's.

    >>> batcher = ParameterSetBatcher(run_batch, max_batch_size=16, max_batch_time=0.01)  # doctest: +SKIP
    >>> table = await batcher.submit(request)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import pandas as pd

from mlflow_clip.serving.errors import SettingsError

__all__ = ["BatchItem", "ParameterSetBatcher", "run_together"]


@dataclass
class BatchItem:
    """One request: its rows (a DataFrame), its parameters, and the key of requests it may share
    a call with."""

    frame: pd.DataFrame
    params: dict[str, Any]
    key: Hashable

    @property
    def rows(self) -> int:
        return len(self.frame)


def run_together(
    predict: Callable[[pd.DataFrame, dict[str, Any]], Any],
    items: Sequence[BatchItem],
    is_client_error: Callable[[BaseException], bool],
) -> list[Any]:
    """Run `items` (all with one key) as one call of `predict`; each item's rows of the answer,
    or the exception its request raises. A client error of a batch of several reruns each alone."""
    if len(items) == 1:
        return [_run_one(predict, items[0])]
    frame = pd.concat([item.frame for item in items], ignore_index=True)
    try:
        out = predict(frame, items[0].params)
    except Exception as e:  # noqa: BLE001 - handed to each request, as its own answer
        if is_client_error(e):
            return [_run_one(predict, item) for item in items]
        return [e] * len(items)
    answers, start = [], 0
    for item in items:
        answers.append(out.iloc[start : start + item.rows].reset_index(drop=True))
        start += item.rows
    return answers


def _run_one(predict: Callable[[pd.DataFrame, dict[str, Any]], Any], item: BatchItem) -> Any:
    try:
        return predict(item.frame, item.params)
    except Exception as e:  # noqa: BLE001
        return e


@dataclass
class _Group:
    items: list[BatchItem] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class ParameterSetBatcher:
    """Gathers concurrent requests per key and runs each gathered batch in a worker thread with
    `run(items) -> [answer or exception per item]` (see `run_together`)."""

    def __init__(self, run: Callable[[list[BatchItem]], list[Any]], max_batch_size: int, max_batch_time: float):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise SettingsError(
                f"Received max_batch_size={max_batch_size!r}; expected a whole number of requests >= 1."
            )
        if isinstance(max_batch_time, bool) or not isinstance(max_batch_time, (int, float)) or max_batch_time < 0:
            raise SettingsError(f"Received max_batch_time={max_batch_time!r}; expected seconds >= 0.")
        self._run, self.max_batch_size, self.max_batch_time = run, max_batch_size, float(max_batch_time)
        self._groups: dict[Hashable, _Group] = {}

    async def submit(self, item: BatchItem) -> Any:
        """The answer to `item` (its rows of its batch's output); raises its request's error."""
        loop = asyncio.get_running_loop()
        group = self._groups.setdefault(item.key, _Group())
        future = loop.create_future()
        group.items.append(item)
        group.futures.append(future)
        if len(group.items) >= self.max_batch_size:
            self._flush(item.key)
        elif group.timer is None:
            group.timer = loop.call_later(self.max_batch_time, self._flush, item.key)
        answer = await future
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _flush(self, key: Hashable) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.get_running_loop().run_in_executor(None, self._run, group.items)
        task.add_done_callback(lambda done: _settle(done, group.futures))


def _settle(done: asyncio.Future, futures: list[asyncio.Future]) -> None:
    if done.cancelled() or done.exception() is not None:
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        answers: list[Any] = [error] * len(futures)
    else:
        answers = done.result()
    for future, answer in zip(futures, answers):
        if not future.done():
            future.set_result(answer)
