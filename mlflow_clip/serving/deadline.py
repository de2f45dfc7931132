"""A request's deadline, checked between pieces of work so that a timed-out request stops.

MLflow's scoring server answers 504 after its request timeout
(`MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`, which `mlflow models serve --timeout` sets) but keeps
running the prediction. The classifier therefore takes that timeout as its own deadline when
it runs under the server (or `deadline_seconds` when set), and checks it between chunks,
shards, images, slices of prompts being tokenized and text-encoder runs: a timed-out request
frees its worker within about one piece of work. Outside a server (a notebook, Spark) there is
no deadline unless set.

    >>> deadline = Deadline.after(30.0)
    >>> deadline.check("decoding")  # raises DeadlineExceeded once 30 s have passed
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .errors import DeadlineExceeded

SERVER_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
IMAGES_FIX = "Send fewer rows or smaller images per request"
TEXT_FIX = "Send fewer labels, templates or texts per request (templates=photo is one prompt per label)"


@dataclass(frozen=True)
class Deadline:
    at: float | None = None  # time.monotonic() value, None: no deadline
    seconds: float = 0.0

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        if not seconds or seconds <= 0:
            return cls()
        return cls(time.monotonic() + seconds, float(seconds))

    @classmethod
    def for_request(cls, deadline_seconds: float = 0.0) -> Deadline:
        """`deadline_seconds` when set, else the scoring server's timeout when serving, else none."""
        if deadline_seconds and deadline_seconds > 0:
            return cls.after(deadline_seconds)
        try:
            return cls.after(float(os.environ.get(SERVER_TIMEOUT_ENV, "0")))
        except ValueError:
            return cls()

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def check(self, what: str, fix: str = IMAGES_FIX) -> None:
        """Raise `DeadlineExceeded` naming `what` was being done and `fix` once the deadline passed."""
        if self.at is not None and time.monotonic() > self.at:
            raise DeadlineExceeded(
                f"The request ran past its {self.seconds:.0f} s deadline while {what}; its work was stopped. "
                f"{fix}, or raise the server's timeout."
            )


NO_DEADLINE = Deadline()
