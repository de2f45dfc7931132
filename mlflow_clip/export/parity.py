"""Parity: the exported ONNX classifier against the PyTorch original, measured and enforced.

Pixels: the torch-free preprocessing serving uses against CLIP's own `preprocess`.
Model: onnxruntime (fed by our preprocessing) against PyTorch (fed by CLIP's preprocessing),
at batch 1, an odd batch size and the whole set.

    >>> report = measure_parity(head, "model.onnx", images, clip_preprocess, preprocessor)  # doctest: +SKIP
    >>> failures = check_gates(report, ParityThresholds(max_prob_diff=1e-4))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from PIL import Image

from mlflow_clip.errors import ParityError
from mlflow_clip.export.spec import PRECISION_THRESHOLDS, ParityThresholds  # noqa: F401 - re-exported
from mlflow_clip.package_data import (
    IMAGE_SUFFIXES,
    default_images_dir,
    sample_image_paths,
)
from mlflow_clip.serving.contract import ClassifierConfig
from mlflow_clip.serving.images import decode_image
from mlflow_clip.serving.openvino_runtime import OPENVINO_INSTALL_HINT, OpenVinoSession, openvino_available
from mlflow_clip.serving.preprocess import Preprocessor
from mlflow_clip.serving.runtime import OPENVINO_PRECISIONS, RuntimeSettings

PARITY_BATCH_SIZES = (1, 3)


@dataclass
class ParityReport:
    image_names: list[str]
    batch_sizes: list[int]
    max_abs_prob_diff: float
    max_abs_logit_diff: float
    top1_agreement: float
    max_abs_pixel_diff: float
    torch_probabilities: list[list[float]] = field(repr=False)
    onnx_probabilities: list[list[float]] = field(repr=False)
    # Only for graphs with an `embedding` output / a text encoder (None otherwise).
    max_abs_embedding_diff: float | None = None
    text: "TextParity | None" = None
    # Figures of related graphs, already named (e.g. the fp16 graph's GPU-like emulation).
    extra_metrics: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "parity_") -> dict[str, float]:
        metrics = {
            f"{prefix}max_abs_prob_diff": self.max_abs_prob_diff,
            f"{prefix}max_abs_logit_diff": self.max_abs_logit_diff,
            f"{prefix}top1_agreement": self.top1_agreement,
            f"{prefix}max_abs_pixel_diff": self.max_abs_pixel_diff,
        }
        if self.max_abs_embedding_diff is not None:
            metrics[f"{prefix}max_abs_embedding_diff"] = self.max_abs_embedding_diff
        if self.text is not None:
            metrics[f"{prefix}max_abs_text_embedding_diff"] = self.text.max_abs_text_embedding_diff
            metrics[f"{prefix}token_mismatches"] = float(self.text.token_mismatches)
            metrics[f"{prefix}text_count"] = float(self.text.count)
        metrics.update(self.extra_metrics)
        return metrics

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class TextParity:
    """The ONNX text encoder fed by the torch-free tokenizer, against `clip.tokenize` +
    PyTorch `encode_text`, over `count` texts."""

    count: int
    max_abs_text_embedding_diff: float
    token_mismatches: int


def load_sample_images(
    folder: str | Path | None = None, draft_size: int | None = None
) -> list[tuple[str, Image.Image]]:
    """Decode every image in `folder` (default: the samples shipped in the package) the way
    serving does: upright, RGB, 8-bit; with `draft_size`, JPEGs in draft mode as a model with
    `jpeg_draft` decodes them."""
    folder = Path(folder) if folder else default_images_dir()
    if not folder.is_dir():
        raise ParityError(f"The parity images folder {folder} does not exist; pass -P images=<folder of images>.")
    paths = sample_image_paths(folder)
    if not paths:
        raise ParityError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; parity needs at least one.")
    return [(p.name, decode_image(p.read_bytes(), draft_size=draft_size)) for p in paths]


@torch.no_grad()
def measure_parity(
    head: torch.nn.Module,
    onnx_path: str | Path,
    images: Sequence[tuple[str, Image.Image]],
    clip_preprocess: Callable,
    preprocessor: Preprocessor,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    precision: str = "fp32",
    runtime: str = "onnxruntime",
    served: Sequence[tuple[str, Image.Image]] | None = None,
) -> ParityReport:
    """The graph runs on `runtime` as serving runs it: bf16 is always OpenVINO with a bf16
    precision hint; `runtime="openvino"` runs another precision's graph on OpenVINO too.
    `served`: the same images decoded as the model decodes them (draft), when that differs; the
    reference always sees `images`, decoded exactly."""
    names = [name for name, _ in images]
    reference_pixels = torch.stack([clip_preprocess(image) for _, image in images])
    ours = preprocessor.batch([image for _, image in (served or images)])
    pixel_diff = float(np.abs(reference_pixels.numpy() - ours).max())

    torch_logits = head.logits(reference_pixels).float()
    torch_probs = head.activate(torch_logits).numpy()
    torch_logits = torch_logits.numpy()
    sizes = sorted({*batch_sizes, len(images)})
    session, outputs = session_with_logits(onnx_path, precision, runtime)
    onnx_probs, onnx_logits, onnx_embeddings = {}, {}, {}
    for size in sizes:
        onnx_probs[size], onnx_logits[size], onnx_embeddings[size] = run_with_logits(session, outputs, ours, size)
    embedding_diff = None
    if onnx_embeddings[len(images)] is not None:
        torch_embeddings = head.embed(reference_pixels).float().numpy()
        embedding_diff = max(float(np.abs(e - torch_embeddings).max()) for e in onnx_embeddings.values())
    prob_diff = max(float(np.abs(p - torch_probs).max()) for p in onnx_probs.values())
    logit_diff = max(float(np.abs(logits - torch_logits).max()) for logits in onnx_logits.values())
    agreement = min(float((p.argmax(1) == torch_probs.argmax(1)).mean()) for p in onnx_probs.values())
    return ParityReport(
        image_names=names,
        batch_sizes=sizes,
        max_abs_prob_diff=prob_diff,
        max_abs_logit_diff=logit_diff,
        top1_agreement=agreement,
        max_abs_pixel_diff=pixel_diff,
        torch_probabilities=torch_probs.tolist(),
        onnx_probabilities=onnx_probs[len(images)].tolist(),
        max_abs_embedding_diff=embedding_diff,
    )


# Texts beyond the class prompts that the text encoder must also get right.
TEXT_PROBES = (
    "",
    "a photo of a forklift.",
    "Is this a FORKLIFT or a pallet?!",
    "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e",
    "\u72ac\u306e\u5199\u771f",
    "\U0001f415 \U0001f469\u200d\U0001f4bb &amp; &lt;b&gt;",
    "tabs\tand   runs of   spaces\n",
    "it's what they're doing, we've seen, I'm sure you'll, he'd",
    "a very long description " * 20,
    # special tokens written in a text, in OpenAI's and open_clip's spellings, and SentencePiece's
    "a <|endoftext|> b <end_of_text> c <|startoftext|> <start_of_text>",
    "a </s> b <pad> c <unk> <s> <eos>",
    # other scripts: per-request labels may come in any language the tokenizer covers
    "\u0444\u043e\u0442\u043e \u043a\u043e\u0448\u043a\u0438",
    "\u03c6\u03c9\u03c4\u03bf\u03b3\u03c1\u03b1\u03c6\u03af\u03b1 \u0393\u0391\u03a4\u0391\u03a3",
    "\u0635\u0648\u0631\u0629 \u0642\u0637\u0629",
    "\u05ea\u05de\u05d5\u05e0\u05d4 \u05e9\u05dc \u05d7\u05ea\u05d5\u05dc",
    "\u0924\u0938\u094d\u0935\u0940\u0930 \u092c\u093f\u0932\u094d\u0932\u0940",
    "\u0e23\u0e39\u0e1b\u0e20\u0e32\u0e1e\u0e41\u0e21\u0e27",
    "\u4e00\u53ea\u732b\u7684\u7167\u7247",
)
MAX_PARITY_TEXTS = 96


@torch.no_grad()
def measure_text_parity(
    model: torch.nn.Module,
    text_encoder_path: str | Path,
    texts: Sequence[str],
    vocab_path: str | Path,
    tokenize: Callable | None = None,
    tokenizer: str = "clip",
    config: ClassifierConfig | None = None,
) -> TextParity:
    """The serving path (`mlflow_clip.serving.text.TextEncoder`: our tokenizer, ids trimmed as the
    text tower allows, the ONNX graph) against the source's tokenizer (`tokenize(texts,
    context_length)`, default `clip.tokenize`) + PyTorch `encode_text`, on at most
    MAX_PARITY_TEXTS texts spread evenly over `texts`, plus TEXT_PROBES. The served tokenizer is
    `config`'s (its tokenizer, cleaning, pooling and context length) or, without a config, CLIP's
    byte-pair encoding with `tokenizer`'s spelling of special tokens."""
    from mlflow_clip.export.graph import clip_tokenize
    from mlflow_clip.serving.text import TextEncoder

    texts = list(texts)
    if len(texts) > MAX_PARITY_TEXTS:
        step = len(texts) / MAX_PARITY_TEXTS
        texts = [texts[int(i * step)] for i in range(MAX_PARITY_TEXTS)]
    texts = [*texts, *TEXT_PROBES]
    if config is None:
        context = int(model.context_length)
        encoder = TextEncoder(text_encoder_path, vocab_path, context, tokenizer=tokenizer)
    else:
        context = int(config.context_length)
        encoder = TextEncoder.for_config(text_encoder_path, vocab_path, config)
    reference_ids = (tokenize or clip_tokenize)(texts, context)
    mismatches = int((reference_ids.numpy() != encoder.tokenize(texts)).any(axis=1).sum())
    reference = model.encode_text(reference_ids).float()
    reference = (reference / reference.norm(dim=-1, keepdim=True)).numpy()
    return TextParity(len(texts), float(np.abs(encoder.embed(texts) - reference).max()), mismatches)


def session_with_logits(onnx_path: str | Path, precision: str = "fp32", runtime: str = "onnxruntime"):
    """A session on the shipped graph that also returns the logits feeding its final Softmax or
    Sigmoid (exposed as an extra output on an in-memory copy), and the output names to fetch. bf16
    graphs, and any graph with `runtime="openvino"`, run on OpenVINO (the serving runtime's
    session, at bf16 for bf16), others on onnxruntime."""
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    output = model.graph.output[0].name
    producer = next(node for node in model.graph.node if output in node.output)
    outputs = [output]
    embedding = [o.name for o in model.graph.output[1:] if o.name == "embedding"]
    if producer.op_type in ("Softmax", "Sigmoid"):
        logits_name = producer.input[0]
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(logits_name))
        outputs.append(logits_name)
    else:
        outputs.append(None)
    outputs.extend(embedding)
    if precision in OPENVINO_PRECISIONS or runtime == "openvino":
        return _openvino_session(model, precision), outputs
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), outputs


class _OpenVinoParitySession:
    """onnxruntime's `get_inputs()` / `run(fetch, feed)` over the serving OpenVINO session."""

    def __init__(self, session: OpenVinoSession):
        self._session = session

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=self._session.input_name)]

    def run(self, fetch: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(next(iter(feed.values())), fetch)


def _openvino_session(model: onnx.ModelProto, precision: str) -> _OpenVinoParitySession:
    if not openvino_available():
        raise ParityError(f"precision={precision} is measured (and served) with OpenVINO: {OPENVINO_INSTALL_HINT}.")
    with tempfile.TemporaryDirectory(prefix="mlflow-clip-parity-") as tmp:
        path = Path(tmp) / "with-logits.onnx"
        path.write_bytes(model.SerializeToString())
        return _OpenVinoParitySession(OpenVinoSession(path, RuntimeSettings(runtime="openvino"), precision))


def run_with_logits(session, outputs: list, batch: np.ndarray, batch_size: int):
    """Probabilities, logits and embeddings (None without that output) for `batch`, run in
    chunks of `batch_size`. `outputs` is [probabilities, logits or None, (embedding)]."""
    feed = session.get_inputs()[0].name
    fetch = [name for name in outputs if name is not None]
    probs, logits, embeddings = [], [], []
    for start in range(0, len(batch), batch_size):
        result = dict(zip(fetch, session.run(fetch, {feed: batch[start : start + batch_size]})))
        probs.append(result[outputs[0]])
        logits.append(result[outputs[1]] if outputs[1] else np.log(np.clip(result[outputs[0]], 1e-30, None)))
        if len(outputs) > 2:
            embeddings.append(result[outputs[2]])
    return np.concatenate(probs), np.concatenate(logits), (np.concatenate(embeddings) if embeddings else None)


def check_gates(report: ParityReport, thresholds: ParityThresholds, prefix: str = "parity_") -> list[str]:
    """Each failed gate as a sentence with its figures; empty when all pass."""
    failures = []
    if not report.max_abs_prob_diff <= thresholds.max_prob_diff:
        failures.append(
            f"{prefix}max_abs_prob_diff = {report.max_abs_prob_diff:.3g} exceeds max_prob_diff = "
            f"{thresholds.max_prob_diff:.3g}"
        )
    if not report.max_abs_logit_diff <= thresholds.max_logit_diff:
        failures.append(
            f"{prefix}max_abs_logit_diff = {report.max_abs_logit_diff:.3g} exceeds max_logit_diff = "
            f"{thresholds.max_logit_diff:.3g}"
        )
    if not report.top1_agreement >= thresholds.min_top1_agreement:
        failures.append(
            f"{prefix}top1_agreement = {report.top1_agreement:.4f} is below min_top1_agreement = "
            f"{thresholds.min_top1_agreement:.4f}"
        )
    if not report.max_abs_pixel_diff <= thresholds.max_pixel_diff:
        failures.append(
            f"{prefix}max_abs_pixel_diff = {report.max_abs_pixel_diff:.3g} exceeds max_pixel_diff = "
            f"{thresholds.max_pixel_diff:.3g}"
        )
    if report.text is not None:
        text = report.text
        if not text.max_abs_text_embedding_diff <= thresholds.max_text_embedding_diff:
            failures.append(
                f"{prefix}max_abs_text_embedding_diff = {text.max_abs_text_embedding_diff:.3g} exceeds "
                f"max_text_embedding_diff = {thresholds.max_text_embedding_diff:.3g}"
            )
        if text.token_mismatches:
            failures.append(
                f"{prefix}token_mismatches = {text.token_mismatches} of {text.count} texts tokenized "
                "differently from the source's tokenizer (clip.tokenize for OpenAI models)"
            )
    return failures


def plot_parity(report: ParityReport, path: str | Path, classes: Sequence[str]) -> Path:
    """Scatter of ONNX vs PyTorch probabilities, one colour per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch_p = np.asarray(report.torch_probabilities)
    onnx_p = np.asarray(report.onnx_probabilities)
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(10, 4.5))
    for c, name in enumerate(classes[:20]):
        ax.scatter(torch_p[:, c], onnx_p[:, c], s=18, label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="PyTorch probability", ylabel="ONNX Runtime probability", title="ONNX vs PyTorch")
    if len(classes) <= 10:
        ax.legend(fontsize=7)
    ax_diff.hist(np.abs(onnx_p - torch_p).ravel(), bins=30, color="tab:orange")
    ax_diff.set(xlabel="|ONNX - PyTorch|", ylabel="count", title=f"max abs diff {report.max_abs_prob_diff:.2e}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
