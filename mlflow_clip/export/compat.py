"""The export world's third-party quirks, handled where they are raised, in one place.

>>> clip = import_clip()  # doctest: +SKIP
>>> with quiet_onnx_export():  # doctest: +SKIP
...     torch.onnx.export(...)
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator


def import_clip() -> ModuleType:
    """`import clip` without its `pkg_resources is deprecated` warning: openai-clip 1.0.1 still
    imports `pkg_resources` (setuptools < 81 keeps it, and the export extra pins that)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*", category=UserWarning)
        import clip
    return clip


@contextmanager
def quiet_onnx_export() -> Iterator[None]:
    """The TorchScript ONNX exporter's warnings that are not the user's concern.

    - `TracerWarning`: torch's attention checks shapes with Python booleans while tracing; they
      are constant for CLIP, and `check_dynamic_batch` runs every exported graph at two batch
      sizes to prove the batch axis stays dynamic.
    - The legacy-exporter `DeprecationWarning`s: the TorchScript exporter is chosen on purpose
      (it supports the original guide's opset 12; the dynamo exporter needs 18).
    - Advanced indexing lowered to Gather and friends, which would misread negative indices:
      Hugging Face text towers index with masks and position ranges (never negative), and the
      text parity gate runs the graph on real ids.
    """
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript-based ONNX export.*", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", message="Exporting aten::index operator of advanced indexing", category=UserWarning
        )
        yield


@contextmanager
def quiet_jit_load() -> Iterator[None]:
    """`torch.jit.load` warns that TorchScript is deprecated; OpenAI publishes its CLIP weights as
    TorchScript archives, which only it reads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated.*", category=FutureWarning)
        yield
