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

from dataclasses import replace

from mlflow_clip.export.checkpoints import LoadedClip, load_clip
from mlflow_clip.export.sources import HF_SOURCE, OPEN_CLIP_SOURCE, parse_model_source


def load_source(model: str, checkpoint: str | None = None) -> LoadedClip:
    """The CLIP model `model` names (with `checkpoint` for open_clip), in float32, eval mode."""
    source = parse_model_source(model, checkpoint)
    if source.kind == OPEN_CLIP_SOURCE:
        from mlflow_clip.export.open_clip_source import load_open_clip

        return load_open_clip(source)
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
