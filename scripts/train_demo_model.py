"""Train the embedded demo CLIP (a tiny, real `clip.model.CLIP`) on synthetic shapes.

The model sees 9 classes ("a red circle" ... "a blue triangle", see mlflow_clip.demo_data)
and learns them through CLIP's own tokenizer, towers and preprocessing, so the exporter,
the ONNX graph and the serving side treat it exactly like an OpenAI checkpoint.

    python scripts/train_demo_model.py                      # writes mlflow_clip/assets/demo_clip.pt
    python scripts/train_demo_model.py --evaluate mlflow_clip/assets/demo_clip.pt

The saved file is a plain state dict with fp16 tensors: `clip.model.build_model(state_dict)`
rebuilds the architecture from the shapes. `clip.load(path, device="cpu", jit=False)` would
too, but openai-clip 1.0.1 retries the state-dict load on the file handle its failed
TorchScript attempt consumed (EOFError, openai/CLIP#396): load it with torch.load +
build_model, as mlflow_clip.export.checkpoints does.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import clip
import numpy as np
import torch
import torch.nn.functional as F
from clip.model import CLIP, build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mlflow_clip.demo_data import COLOURS, DEMO_CLASSES, SHAPES, draw_image, draw_samples  # noqa: E402
from mlflow_clip.serving.prompts import IMAGENET_TEMPLATES, PHOTO_TEMPLATE, fill_template  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "mlflow_clip" / "assets" / "demo_clip.pt"
# build_model infers heads as width // 64, so both widths are multiples of 64. The token
# embedding (49408 x text width) dominates the size: a text width of 64 keeps the fp16 file
# under 10 MB.
ARCHITECTURE = dict(
    embed_dim=64,
    image_resolution=64,
    vision_layers=4,
    vision_width=64,
    vision_patch_size=8,
    context_length=77,
    vocab_size=49408,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=3,
)
MODES = ("none", "photo", "ensemble")
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
# Sides of the training images: some exactly at model resolution, the rest log-uniform.
TRAIN_SIDE_RANGE = (40, 400)
EVAL_SIDE_RANGE = (48, 640)


def build_demo_clip(**overrides: int) -> CLIP:
    """A freshly initialised tiny CLIP with the demo architecture (optionally overridden)."""
    return CLIP(**{**ARCHITECTURE, **overrides})


def captions_for_class(class_name: str) -> list[str]:
    """Training captions: the 80 ImageNet templates, the raw name, the bare name."""
    texts = [fill_template(t, class_name) for t in IMAGENET_TEMPLATES]
    bare = class_name.split(" ", 1)[1]
    return texts + [class_name, bare, fill_template(PHOTO_TEMPLATE, class_name)]


# ---------------------------------------------------------------- data
def preprocess_uint8(image, resolution: int) -> np.ndarray:
    """CLIP's resize + centre crop (PIL bicubic), as HxWx3 uint8; see `to_model_input`."""
    resize_crop = clip.clip._transform(resolution).transforms[:2]
    for step in resize_crop:
        image = step(image)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def to_model_input(batch_uint8: torch.Tensor) -> torch.Tensor:
    """NHWC uint8 -> normalised NCHW float, the same arithmetic as ToTensor + Normalize."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div(255)
    return (x - MEAN) / STD


def _draw_chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, chunk, n, resolution = args
    gen = np.random.default_rng((seed, chunk))  # a seed sequence: never a plain-int eval seed
    labels = gen.permutation(np.arange(n) % len(DEMO_CLASSES))
    low, high = np.log(TRAIN_SIDE_RANGE[0]), np.log(TRAIN_SIDE_RANGE[1])
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    for i, label in enumerate(labels):
        if gen.random() < 0.25:
            size = (resolution, resolution)
        else:
            size = tuple(int(round(math.exp(v))) for v in gen.uniform(low, high, 2))
        image = draw_image(COLOURS[label // len(SHAPES)], SHAPES[label % len(SHAPES)], size, gen)
        images[i] = preprocess_uint8(image, resolution)
    return images, labels


def draw_pool(n: int, seed: int, resolution: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-draw n preprocessed training images (uint8) in chunks, deterministically per seed."""
    chunk = 500
    jobs = [(seed, i, min(chunk, n - start), resolution) for i, start in enumerate(range(0, n, chunk))]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_draw_chunk, jobs)
    else:
        parts = [_draw_chunk(job) for job in jobs]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts])).long()
    return images, labels


# ---------------------------------------------------------------- model helpers
def encode_text_short(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text` on tokens cut after the longest end-of-text token.

    The text transformer is causal, so positions after the end-of-text token never affect
    it: the result equals encode_text on the full 77 tokens, several times faster.
    """
    length = int(tokens.argmax(dim=-1).max()) + 1
    x = model.token_embedding(tokens[:, :length]) + model.positional_embedding[:length]
    x = x.permute(1, 0, 2)
    mask = model.build_attention_mask()[:length, :length]
    for block in model.transformer.resblocks:
        y = block.ln_1(x)
        x = x + block.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


@torch.no_grad()
def class_embeddings(model: CLIP, mode: str, classes: Sequence[str] = DEMO_CLASSES) -> torch.Tensor:
    """Normalised class embeddings for templates none / photo / ensemble (mean of normalised)."""
    templates = {"none": ("{}",), "photo": (PHOTO_TEMPLATE,), "ensemble": IMAGENET_TEMPLATES}[mode]
    rows = []
    for name in classes:
        tokens = clip.tokenize([fill_template(t, name) for t in templates])
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(dim=0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def evaluate(model: CLIP, n: int = 450, seed: int = 2024, side_range=EVAL_SIDE_RANGE) -> dict[str, float]:
    """Zero-shot top-1 per template mode on n fresh images of random sizes, CLIP preprocessing."""
    model.eval()
    resolution = model.visual.input_resolution
    transform = clip.clip._transform(resolution)
    gen = np.random.default_rng(seed)
    sizes = [tuple(int(v) for v in gen.integers(side_range[0], side_range[1] + 1, 2)) for _ in range(n)]
    samples = draw_samples(n, seed, sizes)
    images = torch.stack([transform(img) for img, _ in samples])
    labels = torch.tensor([label for _, label in samples])
    feats = F.normalize(model.encode_image(images).float(), dim=-1)
    return {
        mode: (feats @ class_embeddings(model, mode).T).argmax(dim=-1).eq(labels).float().mean().item()
        for mode in MODES
    }


def save_fp16(model: CLIP, path: Path) -> None:
    """Save a plain fp16 state dict; check that clip.model.build_model rebuilds the same model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    rebuilt = build_model(dict(state)).state_dict()  # build_model deletes keys: give it a copy
    mismatched = {k for k in state if k not in rebuilt or rebuilt[k].shape != state[k].shape}
    if mismatched or set(rebuilt) != set(state):
        raise RuntimeError(f"clip.model.build_model does not rebuild this architecture: {sorted(mismatched)}")
    torch.save(state, path)


def load_for_eval(path: Path) -> CLIP:
    """Load a saved state dict as `clip.load(path, device="cpu", jit=False)` does (float32).

    Not clip.load itself: openai-clip 1.0.1 retries a failed TorchScript load with the file
    handle already at its end, so a plain state dict fails with EOFError (openai/CLIP#396).
    """
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return build_model(state_dict).float().eval()


# ---------------------------------------------------------------- training
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_captions(gen: torch.Generator, per_class: int, caption_tokens: torch.Tensor) -> torch.Tensor:
    """per_class random captions for every class: indices into caption_tokens (classes x captions)."""
    n_classes, n_captions = caption_tokens.shape[:2]
    # Favour the raw class name and the photo template (the last three captions).
    weights = torch.ones(n_captions)
    weights[-3:] = 8.0
    picks = torch.multinomial(weights.expand(n_classes, -1), per_class, replacement=False, generator=gen)
    return caption_tokens[torch.arange(n_classes)[:, None], picks].reshape(-1, caption_tokens.shape[-1])


def balanced_batch(labels_by_class: list[torch.Tensor], per_class: int, gen: torch.Generator) -> torch.Tensor:
    picks = [idx[torch.randint(len(idx), (per_class,), generator=gen)] for idx in labels_by_class]
    return torch.cat(picks)


def contrastive_loss(
    model: CLIP, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, per_class: int
) -> torch.Tensor:
    """Symmetric CLIP loss with class-level positives (duplicates are positives, not negatives).

    Image -> texts: target uniform over the captions of the image's class. Text -> images:
    target uniform over the batch's images of the caption's class.
    """
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(encode_text_short(model, tokens), dim=-1)
    text_labels = torch.arange(len(DEMO_CLASSES)).repeat_interleave(per_class)
    logits = model.logit_scale.exp() * img @ txt.T
    positives = (labels[:, None] == text_labels[None, :]).float()
    i2t = F.cross_entropy(logits, positives / positives.sum(1, keepdim=True))
    t2i = F.cross_entropy(logits.T, (positives / positives.sum(0, keepdim=True)).T)
    return (i2t + t2i) / 2


def param_groups(model: CLIP, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(args: argparse.Namespace) -> CLIP:
    seed_everything(args.seed)
    overrides = {k: v for k, v in vars(args).items() if k in ARCHITECTURE and v is not None}
    model = build_demo_clip(**overrides).float().train()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(args.init_logit_scale))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"architecture {ARCHITECTURE | overrides}, {n_params:,} parameters", flush=True)

    start = time.time()
    pool_x, pool_y = draw_pool(args.pool, args.seed, model.visual.input_resolution, args.workers)
    by_class = [torch.nonzero(pool_y == c).flatten() for c in range(len(DEMO_CLASSES))]
    print(f"drew {len(pool_y)} training images in {time.time() - start:.1f} s", flush=True)
    caption_tokens = torch.stack([clip.tokenize(captions_for_class(c)) for c in DEMO_CLASSES])

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, args.steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    gen = torch.Generator().manual_seed(args.seed)
    per_class = max(1, args.batch_size // len(DEMO_CLASSES))
    for step in range(1, args.steps + 1):
        idx = balanced_batch(by_class, per_class, gen)
        batch = pool_x[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        batch[flip] = batch[flip].flip(2)
        tokens = sample_captions(gen, args.captions_per_class, caption_tokens)
        loss = contrastive_loss(model, to_model_input(batch), pool_y[idx], tokens, args.captions_per_class)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % args.log_every == 0 or step == args.steps:
            print(
                f"step {step}/{args.steps} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.1f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {time.time() - start:.0f}s",
                flush=True,
            )
    return model.eval()


def report(path: Path, n: int, seed: int) -> dict[str, float]:
    model = load_for_eval(path)
    accuracy = evaluate(model, n=n, seed=seed)
    size_mb = path.stat().st_size / 1e6
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{path}: {size_mb:.2f} MB, {n_params:,} parameters")
    print(
        "held-out zero-shot top-1 on %d images of random sizes %s: %s"
        % (n, EVAL_SIDE_RANGE, ", ".join(f"{m} {a:.2%}" for m, a in accuracy.items())),
        flush=True,
    )
    return accuracy


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=36, help="rounded down to a multiple of 9 (balanced classes)")
    p.add_argument("--captions-per-class", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--init-logit-scale",
        type=float,
        default=80.0,
        help="initial exp(logit_scale), learnable, clamped at 100 as in CLIP; CLIP's 1/0.07 "
        "leaves 9 classes stuck on colour alone for hundreds of steps",
    )
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--pool", type=int, default=16000, help="number of pre-drawn training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes drawing the training images")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--eval-images", type=int, default=450)
    p.add_argument("--eval-seed", type=int, default=2024, help="must differ from the training seed")
    p.add_argument("--no-eval", action="store_true", help="skip the final held-out evaluation")
    for name in ("vision_width", "vision_layers", "vision_patch_size", "transformer_layers", "embed_dim"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, help=f"default {ARCHITECTURE[name]}")
    p.add_argument("--evaluate", type=Path, metavar="PATH", help="only evaluate a saved model")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate is not None:
        report(args.evaluate, args.eval_images, args.eval_seed)
        return 0
    start = time.time()
    model = train(args)
    save_fp16(model, args.out)
    print(f"trained in {time.time() - start:.1f} s; saved {args.out}", flush=True)
    if not args.no_eval:
        report(args.out, args.eval_images, args.eval_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
