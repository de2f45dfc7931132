"""The shipped demo CLIP (mlflow_clip/assets/demo_clip.pt) and its training script."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT

clip = pytest.importorskip("clip")
torch = pytest.importorskip("torch")
F = torch.nn.functional

from mlflow_clip.demo_data import DEMO_CLASSES, draw_samples  # noqa: E402
from mlflow_clip.serving.prompts import TEMPLATE_PRESETS, fill_template  # noqa: E402

PACKAGE_DIR = Path(importlib.util.find_spec("mlflow_clip").submodule_search_locations[0])
DEMO_PATH = PACKAGE_DIR / "assets" / "demo_clip.pt"
TRAIN_SCRIPT = ROOT / "scripts" / "train_demo_model.py"
MAX_BYTES = 10_000_000
HELD_OUT_SEED = 31337  # never used in training (the script's default seed is 0)


def clip_load(path: Path):
    """`clip.load(path, device="cpu", jit=False)`, working around openai-clip 1.0.1's handle bug.

    clip.load retries a failed TorchScript load on the same, already consumed file handle, so
    every plain state dict fails with EOFError (openai/CLIP#396). Rewinding the handle after
    the failed attempt lets clip.load's own state-dict path run unchanged.
    """
    original = torch.jit.load

    def rewinding_jit_load(f, *args, **kwargs):
        position = f.tell() if isinstance(f, io.IOBase) else None
        try:
            return original(f, *args, **kwargs)
        except RuntimeError:
            if position is not None:
                f.seek(position)
            raise

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.jit, "load", rewinding_jit_load)
        return clip.load(str(path), device="cpu", jit=False)


@pytest.fixture(scope="module")
def state_dict():
    return torch.load(DEMO_PATH, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def demo_model(state_dict):
    return clip.model.build_model(dict(state_dict)).float().eval()


def test_shipped_file_is_small_and_fp16(state_dict):
    assert DEMO_PATH.stat().st_size <= MAX_BYTES
    assert all(value.dtype == torch.float16 for value in state_dict.values())


def test_build_model_rebuilds_the_saved_architecture(state_dict, demo_model):
    assert isinstance(demo_model, clip.model.CLIP)
    assert demo_model.visual.input_resolution == 64
    assert demo_model.context_length == 77 and demo_model.vocab_size == 49408
    rebuilt = demo_model.state_dict()
    assert set(rebuilt) == set(state_dict)
    for key, value in state_dict.items():
        assert rebuilt[key].shape == value.shape, key
        torch.testing.assert_close(rebuilt[key], value.float(), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_clip_load_reads_the_file(demo_model):
    model, preprocess = clip_load(DEMO_PATH)
    assert next(model.parameters()).dtype == torch.float32
    tokens = clip.tokenize(["a red circle", "a photo of a blue square."])
    image = preprocess(draw_samples(1, seed=HELD_OUT_SEED, sizes=(123, 77))[0][0]).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), demo_model.encode_text(tokens))
        torch.testing.assert_close(model.encode_image(image), demo_model.encode_image(image))


@pytest.fixture(scope="module")
def held_out(demo_model):
    """Normalised features and labels of 180 fresh images of random sizes (48..640 px)."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    sizes = [tuple(int(v) for v in rng.integers(48, 641, 2)) for _ in range(180)]
    samples = draw_samples(180, seed=HELD_OUT_SEED, sizes=sizes)
    preprocess = clip.clip._transform(64)
    images = torch.stack([preprocess(image) for image, _ in samples])
    with torch.no_grad():
        features = F.normalize(demo_model.encode_image(images), dim=-1)
    return features, torch.tensor([label for _, label in samples])


@pytest.mark.parametrize("mode", ["none", "photo", "ensemble"])
def test_zero_shot_top1_at_least_95_percent(demo_model, held_out, mode):
    features, labels = held_out
    rows = []
    with torch.no_grad():
        for name in DEMO_CLASSES:
            tokens = clip.tokenize([fill_template(t, name) for t in TEMPLATE_PRESETS[mode]])
            rows.append(F.normalize(F.normalize(demo_model.encode_text(tokens), dim=-1).mean(0), dim=-1))
    accuracy = (features @ torch.stack(rows).T).argmax(-1).eq(labels).float().mean().item()
    assert accuracy >= 0.95, f"{mode}: {accuracy:.1%}"


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_demo_model", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fast_preprocessing_matches_clip_transform(train_script):
    transform = clip.clip._transform(64)
    for image, _ in draw_samples(6, seed=HELD_OUT_SEED, sizes=None):
        fast = train_script.to_model_input(torch.from_numpy(train_script.preprocess_uint8(image, 64))[None])[0]
        assert torch.equal(fast, transform(image))


def test_training_smoke_writes_a_loadable_state_dict(train_script, tmp_path):
    out = tmp_path / "tiny.pt"
    threads = torch.get_num_threads()
    args = [
        "--steps",
        "3",
        "--batch-size",
        "18",
        "--pool",
        "36",
        "--workers",
        "1",
        "--log-every",
        "1",
        "--threads",
        str(threads),
        "--no-eval",
        "--out",
        str(out),
    ]
    assert train_script.main(args) == 0
    model = clip.model.build_model(torch.load(out, map_location="cpu", weights_only=True)).float()
    assert model.visual.input_resolution == 64
    accuracy = train_script.evaluate(model, n=9, seed=HELD_OUT_SEED)
    assert set(accuracy) == {"none", "photo", "ensemble"}
