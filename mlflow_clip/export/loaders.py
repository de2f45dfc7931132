"""Load the weights a `-P model=` / `-P checkpoint=` pair names, from whichever source it is.

Export world. OpenAI's names, `demo` and OpenAI checkpoint paths go to `checkpoints.load_clip`;
`open_clip:<architecture>` goes to `open_clip_source.load_open_clip`, `hf:<folder>` to
`hf_source.load_hf`. Either way the result is a
`LoadedClip` whose `details` say where the weights came from and what parity compares against.

    >>> loaded = load_source("open_clip:ViT-B-32", "/models/open_clip_pytorch_model.bin")  # doctest: +SKIP
    >>> loaded.details["source"], loaded.name  # doctest: +SKIP
    ('open_clip', 'open_clip:ViT-B-32')
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from mlflow_clip.export.checkpoints import LoadedClip, load_clip
from mlflow_clip.export.hf_folder import SIGLIP_FAMILY
from mlflow_clip.export.open_clip_configs import CLIP_TEXT
from mlflow_clip.export.sources import HF_SOURCE, OPEN_CLIP_SOURCE, parse_model_source


def load_source(
    model: str, checkpoint: str | None = None, tokenizer: str | None = None, work_dir: str | Path | None = None
) -> LoadedClip:
    """The CLIP model `model` names (with `checkpoint` and `tokenizer` for open_clip), in float32,
    eval mode. A tokenizer that is not CLIP's has its served files written into `work_dir` (a
    new temporary folder by default)."""
    source = parse_model_source(model, checkpoint, tokenizer)
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="mlflow-clip-tokenizer-"))
    if source.kind == OPEN_CLIP_SOURCE and source.family != CLIP_TEXT:
        from mlflow_clip.export.open_clip_text_source import load_open_clip_text

        return load_open_clip_text(source, work_dir)
    if source.kind == OPEN_CLIP_SOURCE:
        from mlflow_clip.export.open_clip_source import load_open_clip

        return load_open_clip(source)
    if source.kind == HF_SOURCE and source.family == SIGLIP_FAMILY:
        from mlflow_clip.export.hf_siglip_source import load_hf_siglip

        return load_hf_siglip(source, work_dir)
    if source.kind == HF_SOURCE:
        from mlflow_clip.export.hf_source import load_hf

        return load_hf(source)
    loaded = load_clip(model)
    details = {
        **source.run_params(),
        "architecture": loaded.name,
        "activation": "QuickGELU",
        "tokenizer": "clip",
        "parity_reference": f"OpenAI CLIP {loaded.name}, clip's own preprocess and clip.tokenize",
    }
    return replace(loaded, details=details)
