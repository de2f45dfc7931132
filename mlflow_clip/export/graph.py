"""The exported graphs: CLIP's visual encoder with the class text features baked in, and CLIP's
text encoder.

Classifier: image [N,3,R,R] -> visual encoder -> L2 normalize -> logit_scale * cosine similarity
with the normalized class text features (+ logit_bias, SigLIP's) -> softmax (CLIP's head) or a
sigmoid per class (SigLIP's) -> scores [N,C]. The served graph also
returns the normalized image embedding [N,D] as a second output; the edge file is the same graph
with only the probabilities (`write_edge_file`), so the visual weights are stored once per file.

Text encoder: token ids [N,L] (L <= context_length) -> L2-normalized text embeddings [N,D].

    >>> head = ZeroShotHead(model.visual, text_features, logit_scale=100.0)  # doctest: +SKIP
    >>> export_onnx(head, "model.onnx", resolution=224, opset=17)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from mlflow_clip.errors import GraphError, SpecError
from mlflow_clip.export.compat import import_clip, quiet_onnx_export
from mlflow_clip.export.spec import DEFAULT_OPSET, check_opset
from mlflow_clip.serving.contract import (
    EDGE_INPUT_NAME,
    EMBEDDING_OUTPUT,
    SIGMOID_HEAD,
    SOFTMAX_HEAD,
    TEXT_INPUT,
    TEXT_OUTPUT,
    ClassifierConfig,
    edge_output_name,
)
from mlflow_clip.serving.prompts import texts_for_class

_logger = logging.getLogger(__name__)

# Prompts per PyTorch text-encoder call when baking the class features.
EXPORT_TEXT_BATCH = 256
_TWO_GIB = 2 * 1024**3
_TOO_LARGE = "The graph is 2 GB or larger; protobuf cannot hold it in one file."
# PyTorch's attention lowers to scaled_dot_product_attention, which ONNX has from opset 14.
SDPA_OPSET = 14


class ZeroShotHead(nn.Module):
    """CLIP's image tower followed by the zero-shot head; `forward` gives the scores: softmax
    probabilities (`head="softmax"`) or one sigmoid per class (`head="sigmoid"`, SigLIP's), over
    `logit_scale * cosine + logit_bias` (no bias term at all when `logit_bias` is None, as for CLIP)."""

    def __init__(
        self,
        visual: nn.Module,
        text_features: torch.Tensor,
        logit_scale: float,
        logit_bias: float | None = None,
        head: str = SOFTMAX_HEAD,
    ):
        super().__init__()
        if head not in (SOFTMAX_HEAD, SIGMOID_HEAD):
            raise SpecError(f"Received head={head!r}; expected {SOFTMAX_HEAD!r} or {SIGMOID_HEAD!r}.")
        self.visual = visual
        self.head = head
        self.register_buffer("text_features", text_features.float().t().contiguous())  # [D, C]
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.logit_bias: torch.Tensor | None
        if logit_bias is None:
            self.logit_bias = None
        else:
            self.register_buffer("logit_bias", torch.tensor(float(logit_bias)))

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The L2-normalized image embedding [N, D]."""
        features = self.visual(image)
        return features / features.norm(dim=-1, keepdim=True)

    def scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits [N, C]: the logit scale times the cosine similarity to each class (plus the bias)."""
        logits = self.logit_scale * embedding @ self.text_features
        return logits if self.logit_bias is None else logits + self.logit_bias

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.scores(self.embed(image))

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's scores from its logits: softmax over the classes, or a sigmoid each."""
        return logits.sigmoid() if self.head == SIGMOID_HEAD else logits.softmax(dim=-1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.activate(self.logits(image))


class _WithEmbedding(nn.Module):
    """Export wrapper: (probabilities, normalized embedding) from one pass of the encoder."""

    def __init__(self, head: ZeroShotHead):
        super().__init__()
        self.head = head

    def forward(self, image: torch.Tensor):
        embedding = self.head.embed(image)
        return self.head.activate(self.head.scores(embedding)), embedding


class TextTower(nn.Module):
    """CLIP's `encode_text` followed by L2 normalization, for token ids [N, L], L <= context_length.

    CLIP's text transformer is causal and reads its output at the end-of-text token, so the
    positions after the last end-of-text token of a batch cannot change the result: serving trims
    the ids to that length, which costs a fraction of the full context for short prompts.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.token_embedding = model.token_embedding
        self.register_buffer("positional_embedding", model.positional_embedding.detach().float().clone())
        self.blocks = model.transformer.resblocks
        self.ln_final = model.ln_final
        self.register_buffer("text_projection", model.text_projection.detach().float().clone())
        self.register_buffer("attn_mask", model.build_attention_mask())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.token_embedding(tokens).float() + self.positional_embedding[:length]
        x = x.permute(1, 0, 2)  # NLD -> LND
        mask = self.attn_mask[:length, :length]
        for block in self.blocks:
            # Written out (not nn.MultiheadAttention): the TorchScript exporter bakes the batch
            # size into the fused attention's reshapes when a mask is given.
            y = block.ln_1(x)
            weights, biases = block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)
            x = x + _attention(y, y, y, weights, biases, block.attn.out_proj, block.attn.num_heads, mask)
            x = x + block.mlp(block.ln_2(x))
        x = self.ln_final(x.permute(1, 0, 2))
        # The features at each text's end-of-text token (the highest id). A gather rather than
        # x[arange, argmax]: the same values, without the exporter's advanced-indexing lowering.
        ends = tokens.argmax(dim=-1)[:, None, None].expand(-1, 1, x.shape[-1])
        x = x.gather(1, ends).squeeze(1) @ self.text_projection
        return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def encode_text_features(
    model: nn.Module, classes: Sequence[str], templates: Sequence[str], tokenize: Callable | None = None
) -> torch.Tensor:
    """Normalized class embeddings [C, D]: per class, the renormalized mean of the
    L2-normalized embeddings of its prompt texts (one text per template). `tokenize(texts,
    context_length)` is the source's own tokenizer (default `clip.tokenize`, truncating)."""
    tokenize = tokenize or clip_tokenize
    rows = []
    for name in classes:
        texts = texts_for_class(name, templates)
        embeddings = []
        for start in range(0, len(texts), EXPORT_TEXT_BATCH):
            tokens = tokenize(texts[start : start + EXPORT_TEXT_BATCH], int(model.context_length))
            embedding = model.encode_text(tokens).float()
            embeddings.append(embedding / embedding.norm(dim=-1, keepdim=True))
        mean = torch.cat(embeddings).mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def clip_tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """`clip.tokenize`, truncating as CLIP's prompts are: the default `tokenize` of the export."""
    return import_clip().tokenize(list(texts), context_length=context_length, truncate=True)


def export_onnx(
    head: ZeroShotHead, path: str | Path, resolution: int, opset: int = DEFAULT_OPSET, embedding: bool = True
) -> Path:
    """Export with the TorchScript exporter (supports the original guide's opset 12),
    with a dynamic batch axis, into one self-contained file. With `embedding`, the graph also
    returns the normalized image embedding as a second output named `embedding`."""
    check_opset(opset)
    module: nn.Module = _WithEmbedding(head) if embedding else head
    outputs = ["probabilities", EMBEDDING_OUTPUT] if embedding else ["probabilities"]
    dummy = torch.randn(2, 3, resolution, resolution)
    return _export(
        module, (dummy,), path, ["image"], outputs, {name: {0: "batch"} for name in ["image", *outputs]}, opset
    )


def export_text_encoder(model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """CLIP's text encoder as ONNX: int64 `tokens` [N, L] -> float32 `text_embedding` [N, D],
    L2-normalized, with dynamic N and L (up to the model's context length)."""
    check_opset(opset)
    encoder = TextTower(model).eval()
    dummy = torch.zeros(2, 7, dtype=torch.int64)
    dummy[:, 1:6] = 320
    dummy[:, 6] = model.vocab_size - 1
    axes = {TEXT_INPUT: {0: "batch", 1: "length"}, TEXT_OUTPUT: {0: "batch"}}
    return _export(encoder, (dummy,), path, [TEXT_INPUT], [TEXT_OUTPUT], axes, opset)


def export_text_module(
    module: nn.Module,
    path: str | Path,
    example_ids: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    full_context: bool = False,
) -> Path:
    """A source's own text encoder (`module`: int64 ids [N, L] -> L2-normalized embeddings) as
    ONNX, traced on `example_ids` (real tokenizer output, padding included, so that the tower's
    padding path is the one traced), with a dynamic batch axis and, unless `full_context` (towers
    in which every position counts), a dynamic length axis."""
    check_opset(opset)
    axes = {TEXT_INPUT: {0: "batch"} if full_context else {0: "batch", 1: "length"}, TEXT_OUTPUT: {0: "batch"}}
    return _export(module.eval(), (example_ids,), path, [TEXT_INPUT], [TEXT_OUTPUT], axes, opset)


def _export(module: nn.Module, args, path, input_names, output_names, dynamic_axes, opset: int) -> Path:
    if opset < SDPA_OPSET:
        module = with_explicit_attention(module)
    path = Path(path)
    buffer = io.BytesIO()
    with quiet_onnx_export():
        torch.onnx.export(
            module.eval(),
            args,
            buffer,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    _write_single_file(buffer.getvalue(), path)  # as torch serialized it: no parse and re-serialize
    return path


def write_edge_file(served_path: str | Path, edge_path: str | Path) -> Path:
    """The edge-convention file: the served graph with only its first output (the scores)."""
    model = onnx.load(str(served_path))
    while len(model.graph.output) > 1:
        model.graph.output.pop()
    save_single_file(model, edge_path)
    return Path(edge_path)


def save_single_file(model: onnx.ModelProto, path: str | Path) -> None:
    """Save with the weights inside the .onnx file (no external-data side file). Serialized once:
    a graph's size is the length of its bytes (`ByteSize` would walk the weights a second time)."""
    try:
        data = model.SerializeToString()
    except ValueError as e:  # protobuf refuses to serialize a message of 2 GB or more
        raise SpecError(_TOO_LARGE) from e
    _write_single_file(data, path)


def _write_single_file(data: bytes, path: str | Path) -> None:
    if len(data) >= _TWO_GIB:
        raise SpecError(_TOO_LARGE)
    Path(path).write_bytes(data)


def simplify_onnx(path: str | Path) -> tuple[bool, str]:
    """Simplify in place with onnxsim; on failure keep the original graph and say why."""
    try:
        from onnxsim import simplify

        model = onnx.load(str(path))
        simplified, ok = simplify(model)
    except Exception as e:  # onnxsim raises a variety of errors on exotic graphs
        return False, f"onnxsim failed: {type(e).__name__}: {e}"
    if not ok:
        return False, "onnxsim could not validate the simplified graph"
    save_single_file(simplified, path)
    return True, "simplified"


def apply_conventions(path: str | Path, config: ClassifierConfig) -> ClassifierConfig:
    """Name the input `image-` and the output `scores-0:a;1:b`, write the normalization JSON into
    the graph doc_string (both with sclblonnx), and the full config as metadata_props."""
    from sclblonnx.input import rename_input_image
    from sclblonnx.output import rename_class_probabilities_output

    model = onnx.load(str(path))
    graph = model.graph
    output_name = edge_output_name(config.classes)
    if rename_input_image(graph, graph.input[0].name) is False:
        raise GraphError("sclblonnx could not rename the graph input")
    if rename_class_probabilities_output(graph, graph.output[0].name, config.classes) is False:
        raise GraphError("sclblonnx could not rename the graph output")
    graph.doc_string = edge_doc_string(config.mean, config.std)
    config = ClassifierConfig.from_dict({**config.to_dict(), "input_name": EDGE_INPUT_NAME, "output_name": output_name})
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, config.to_metadata_props())
    model.producer_name = "mlflow-clip"
    save_single_file(model, path)
    return config


def edge_doc_string(mean: Sequence[float], std: Sequence[float]) -> str:
    """`{"means": [...], "vars": [...]}` on the 0-255 scale, rounded to 2 decimals."""
    return json.dumps({"means": [round(255 * m, 2) for m in mean], "vars": [round(255 * s, 2) for s in std]})


def check_dynamic_batch(
    path: str | Path, resolution: int, batch_sizes: Sequence[int] = (1, 3), head: str = SOFTMAX_HEAD
) -> None:
    """Run the graph at batch 1 and an odd batch size; each must give [N, C] rows of scores in
    [0, 1] (summing to 1 for the softmax head)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    for batch in batch_sizes:
        x = rng.standard_normal((batch, 3, resolution, resolution), dtype=np.float32)
        out = session.run(None, {name: x})[0]
        sums_ok = head != SOFTMAX_HEAD or np.allclose(out.sum(axis=1), 1.0, atol=1e-4)
        scores_ok = sums_ok and bool(np.all((out >= 0) & (out <= 1)))
        if out.shape[0] != batch or not scores_ok:
            raise GraphError(f"The exported graph gave shape {out.shape} for batch {batch}; expected ({batch}, C).")


def with_explicit_attention(module: nn.Module) -> nn.Module:
    """A copy of `module` whose attention layers are written out as matmul + softmax, for
    opsets that predate PyTorch's fused attention op. Same weights, same math."""
    import copy

    clip = import_clip()

    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, _ExplicitMultiheadAttention(child))
            elif isinstance(child, clip.model.AttentionPool2d):
                setattr(parent, name, _ExplicitAttentionPool(child))
    return module


def _attention(q, k, v, weights, biases, out_proj: nn.Linear, heads: int, mask=None):
    """Multi-head attention on [L, N, E] inputs, as torch.nn.functional computes it."""
    length, batch, width = q.shape
    head_dim = width // heads
    q = nn.functional.linear(q, weights[0], biases[0])
    k = nn.functional.linear(k, weights[1], biases[1])
    v = nn.functional.linear(v, weights[2], biases[2])
    q = q.reshape(length, batch * heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], batch * heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], batch * heads, head_dim).transpose(0, 1)
    scores = torch.bmm(q * head_dim**-0.5, k.transpose(1, 2))
    if mask is not None:
        scores = scores + mask
    out = torch.bmm(scores.softmax(dim=-1), v)
    out = out.transpose(0, 1).reshape(length, batch, width)
    return out_proj(out)


class _ExplicitMultiheadAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads = mha.num_heads
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query, key, value, need_weights=False, attn_mask=None):
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3)
        return _attention(query, key, value, weights, biases, self.out_proj, self.num_heads, attn_mask), None


class _ExplicitAttentionPool(nn.Module):
    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        p = self.pool
        x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + p.positional_embedding[:, None, :].to(x.dtype)
        weights = (p.q_proj.weight, p.k_proj.weight, p.v_proj.weight)
        biases = (p.q_proj.bias, p.k_proj.bias, p.v_proj.bias)
        return _attention(x, x, x, weights, biases, p.c_proj, p.num_heads)[0]
