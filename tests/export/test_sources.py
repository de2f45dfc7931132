"""open_clip models from local checkpoints: the spec checked before torch loads, QuickGELU chosen
explicitly, open_clip's preprocessing and tokenizer reproduced exactly, the parity gates met, and
the exported model served torch-free. Random weights from open_clip's own configs; no network."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from helpers import BLOCK_TORCH, ROOT, exported_in_store, family_export, has_module, requires_export, subprocess_env
from stores import fresh_sqlite_uri

from mlflow_clip.export.sources import SourceError, parse_model_source
from mlflow_clip.export.spec import ExportSpec

requires_open_clip = pytest.mark.skipif(
    not has_module("open_clip"), reason="needs the sources extra: pip install '.[sources]'"
)
pytestmark = [requires_export, requires_open_clip]

CLASSES = ["a red circle", "a green square", "a blue triangle"]
# The blocked imports of a torch-free process: torch, CLIP and the sources' libraries.
BLOCK_SOURCES = BLOCK_TORCH.replace('"clip"}', '"clip", "open_clip", "timm", "transformers"}')


def _tokenizer_corpus() -> list[str]:
    """The varied texts the tokenizer tests use (tests/serving/test_tokenizer.py)."""
    spec = importlib.util.spec_from_file_location("_tokenizer_corpus", ROOT / "tests/serving/test_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.varied_texts()


@pytest.fixture(scope="module")
def small_checkpoint(module_tmp):
    from mlflow_clip.export.open_clip_source import save_random_open_clip_checkpoint

    return save_random_open_clip_checkpoint("ViT-S-32", module_tmp("oc") / "vit-s-32.bin", seed=1)


# Spec parsing: torch-free, one line, before anything loads.


def test_open_clip_spec_is_parsed_with_its_architecture_and_activation(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"not read before torch loads")
    gelu = parse_model_source("open_clip:ViT-B-32", str(weights))
    assert (gelu.kind, gelu.architecture, gelu.activation, gelu.force_quick_gelu) == (
        "open_clip",
        "ViT-B-32",
        "GELU",
        False,
    )
    # open_clip's own -quickgelu config, and a -quickgelu forced on an architecture without one
    assert parse_model_source("open_clip:ViT-B-32-quickgelu", str(weights)).activation == "QuickGELU"
    forced = parse_model_source("open_clip:ViT-S-32-quickgelu", str(weights))
    assert (forced.architecture, forced.activation, forced.force_quick_gelu) == ("ViT-S-32", "QuickGELU", True)
    assert forced.name == "open_clip:ViT-S-32-quickgelu"
    assert parse_model_source("RN50").kind == "openai"


@pytest.mark.parametrize(
    "model, checkpoint, words",
    [
        ("open_clip:ViT-Q-99", "FILE", "is not one of open_clip's"),
        ("open_clip:ViT-B-32", "", "without a checkpoint"),
        ("open_clip:ViT-B-32", "/no/such/file.bin", "no file exists there"),
        ("open_clip:ViT-B-16-SigLIP", "FILE", "pass -P tokenizer=<local folder"),
        ("open_clip:xlm-roberta-base-ViT-B-32", "FILE", "pass -P tokenizer=<local folder"),
        ("open_clip:coca_ViT-B-32", "FILE", "CoCa"),
        ("open_clip:EVA02-B-16", "FILE", "custom text tower"),
        ("RN50", "FILE", "checkpoint goes with model=open_clip"),
        ("hub:org/model", "", "expected an OpenAI CLIP name"),
        ("hf:/models/clip-vit-base-patch32", "", "no folder exists"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_fix(tmp_path, model, checkpoint, words):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    with pytest.raises(SourceError, match=words) as info:
        ExportSpec.create("a,b", model=model, checkpoint=str(weights) if checkpoint == "FILE" else checkpoint)
    assert "\n" not in str(info.value)


def test_open_clip_needs_opset_14_and_refuses_openai_torchscript_archives(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    with pytest.raises(SourceError, match="opset 14 or newer"):
        ExportSpec.create("a,b", model="open_clip:ViT-B-32", checkpoint=str(weights), opset=12)
    archive = tmp_path / "ViT-B-32.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ViT-B-32/code/__torch__/model.py", "")
    with pytest.raises(SourceError, match="OpenAI TorchScript archive"):
        ExportSpec.create("a,b", model="open_clip:ViT-B-32", checkpoint=str(archive))


def test_a_bad_spec_is_refused_before_torch_is_imported(tmp_path):
    script = BLOCK_TORCH + textwrap.dedent(
        """
        from mlflow_clip.export.spec import ExportSpec
        from mlflow_clip.export.sources import SourceError
        try:
            ExportSpec.create("a,b", model="open_clip:ViT-B-16-SigLIP", checkpoint=__file__)
        except SourceError as e:
            print("REFUSED", e)
        assert not any(m.split(".")[0] in {"torch", "open_clip", "transformers"} for m in sys.modules)
        """
    )
    path = tmp_path / "check.py"
    path.write_text(script)
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED" in result.stdout and "tokenizer" in result.stdout


# QuickGELU, preprocessing and tokenizer.


def test_quickgelu_is_the_explicit_choice_and_changes_the_model(small_checkpoint):
    import torch

    from mlflow_clip.export.loaders import load_source

    gelu = load_source("open_clip:ViT-S-32", str(small_checkpoint))
    quick = load_source("open_clip:ViT-S-32-quickgelu", str(small_checkpoint))
    assert (gelu.details["activation"], quick.details["activation"]) == ("GELU", "QuickGELU")
    assert "QuickGELU" in quick.details["parity_reference"]
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        difference = (gelu.model.encode_image(image) - quick.model.encode_image(image)).abs().max()
    assert float(difference) > 1e-3  # the same weights under the other activation are another model


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_preprocessing_equals_open_clips_transform_bit_for_bit(interpolation):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from mlflow_clip.export.parity import load_sample_images
    from mlflow_clip.serving.preprocess import Preprocessor

    rng = np.random.default_rng(3)
    images = [image for _, image in load_sample_images()]
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(301, 97), (97, 640)]]
    for size in (224, 240):
        transform = image_transform_v2(PreprocessCfg(size=size, interpolation=interpolation), is_train=False)
        ours = Preprocessor(size, resample=interpolation).batch(images)
        reference = np.stack([transform(image).numpy() for image in images])
        assert np.abs(ours - reference).max() == 0.0


def test_modes_the_preprocessing_cannot_reproduce_are_refused():
    from open_clip.transform import PreprocessCfg

    from mlflow_clip.export.open_clip_source import check_preprocess_cfg

    source = parse_model_source("RN50")
    assert check_preprocess_cfg(source, PreprocessCfg(size=(224, 224))) == (
        224,
        "bicubic",
        "shortest_side_then_center_crop",
    )
    assert check_preprocess_cfg(source, PreprocessCfg(size=256, resize_mode="squash")) == (256, "bicubic", "squash")
    for cfg, words in [
        (PreprocessCfg(resize_mode="longest"), "longest"),
        (PreprocessCfg(size=(224, 256)), "not square"),
    ]:
        with pytest.raises(SourceError, match=words):
            check_preprocess_cfg(source, cfg)


def test_torch_free_tokenizer_gives_open_clips_ids_on_the_tokenizer_corpus():
    import open_clip

    from mlflow_clip.package_data import default_vocab_path
    from mlflow_clip.serving.tokenizer import ClipTokenizer

    texts = _tokenizer_corpus()
    assert len(texts) > 1000
    theirs = open_clip.get_tokenizer("ViT-B-32")(texts).numpy()
    ours = ClipTokenizer.from_file(default_vocab_path(), "open_clip")(texts, context_length=77, truncate=True)
    assert int((theirs != ours).any(axis=1).sum()) == 0
    # open_clip spells its special tokens <start_of_text>: CLIP's <|endoftext|> is plain text to it
    clips = ClipTokenizer.from_file(default_vocab_path())(texts, context_length=77, truncate=True)
    differing = [text for text, row in zip(texts, (theirs != clips).any(axis=1)) if row]
    assert differing and all("<|" in text.lower() or "_of_text>" in text.lower() for text in differing)


# The export, its gates, and the model served torch-free.


@pytest.fixture(scope="module")
def small_export(small_checkpoint, module_tmp):
    with exported_in_store(
        module_tmp("store"),
        "sources",
        "oc-small",
        classes=CLASSES,
        model="open_clip:ViT-S-32",
        checkpoint=str(small_checkpoint),
        templates="photo",
    ) as exported:
        yield exported


@family_export
def test_open_clip_export_meets_every_parity_gate(small_export):
    result, run, version, _ = small_export
    metrics = result.metrics
    assert metrics["parity_max_abs_prob_diff"] <= 1e-5
    assert metrics["parity_max_abs_pixel_diff"] == 0.0
    assert metrics["parity_token_mismatches"] == 0.0
    assert metrics["parity_top1_agreement"] == 1.0
    assert metrics["parity_max_abs_text_embedding_diff"] <= 1e-5
    params = run.data.params
    assert (params["source"], params["architecture"], params["activation"]) == ("open_clip", "ViT-S-32", "GELU")
    assert params["parity_reference"].startswith("open_clip ")
    assert {k: version.tags[k] for k in ("source", "architecture", "activation", "clip_model")} == {
        "source": "open_clip",
        "architecture": "ViT-S-32",
        "activation": "GELU",
        "clip_model": "open_clip:ViT-S-32",
    }


@family_export
def test_the_contract_records_the_sources_preprocessing_and_logit_scale(small_export):
    _, _, _, local = small_export
    from mlflow_clip.serving.contract import ClassifierConfig

    config = ClassifierConfig.from_onnx(f"{local}/{_flavor_conf(local)['onnx_model']}")
    assert (config.input_resolution, config.interpolation, config.resize_mode) == (
        224,
        "bicubic",
        "shortest_side_then_center_crop",
    )
    assert config.clip_model == "open_clip:ViT-S-32" and config.clip_version.startswith("open_clip_torch ")
    assert config.logit_scale == pytest.approx(100.0, rel=1e-5)  # read from the checkpoint
    assert config.tokenizer == "open_clip"  # special tokens spelled as open_clip's SimpleTokenizer does


def _flavor_conf(local) -> dict:
    import yaml

    with open(f"{local}/MLmodel", encoding="utf-8") as f:
        return yaml.safe_load(f)["flavors"]["mlflow_clip"]


@family_export
def test_the_exported_model_predicts_torch_free_with_baked_and_per_request_labels(small_export, tmp_path):
    _, _, _, local = small_export
    script = BLOCK_SOURCES + textwrap.dedent(
        f"""
        import io, json, mlflow, pandas as pd
        from PIL import Image
        buffer = io.BytesIO()
        Image.new("RGB", (120, 90), (30, 40, 220)).save(buffer, format="PNG")
        frame = pd.DataFrame({{"image": [buffer.getvalue()]}})
        model = mlflow.pyfunc.load_model({str(local)!r})
        baked = model.predict(frame)
        labels = model.predict(frame, params={{"classes": {CLASSES!r}}})
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("OUT", json.dumps([list(baked["probabilities"][0]), list(labels["probabilities"][0])]))
        """
    )
    path = tmp_path / "serve.py"
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    baked, per_request = json.loads(result.stdout.split("OUT ", 1)[1])
    np.testing.assert_allclose(baked, per_request, atol=1e-5)
    assert sum(baked) == pytest.approx(1.0, abs=1e-5)


# Full-size architectures and the real `mlflow run` (slow).


@pytest.mark.slow
# ViT-S-32-quickgelu: QuickGELU forced on an architecture open_clip has no -quickgelu config for.
@pytest.mark.parametrize(
    "architecture", ["ViT-B-32", "ViT-B-16", "RN50-quickgelu", "convnext_tiny", "ViT-S-32-quickgelu"]
)
def test_full_size_open_clip_architectures_meet_the_gates(architecture, tmp_path):
    """Each through the real `mlflow run`, with the probability gate at 1e-5."""
    from mlflow_clip.export.open_clip_source import save_random_open_clip_checkpoint

    checkpoint = save_random_open_clip_checkpoint(architecture, tmp_path / f"{architecture}.bin")
    version, run = _mlflow_run(
        tmp_path, f"model=open_clip:{architecture}", f"checkpoint={checkpoint}", "max_prob_diff=1e-5"
    )
    metrics = run.data.metrics
    assert metrics["parity_max_abs_prob_diff"] <= 1e-5 and metrics["parity_max_abs_pixel_diff"] == 0.0
    assert metrics["parity_token_mismatches"] == 0.0 and metrics["parity_max_abs_text_embedding_diff"] <= 1e-5
    assert version.tags["activation"] == ("QuickGELU" if "quickgelu" in architecture else "GELU")
    assert version.tags["parity_status"] == "passed"


def _mlflow_run(tmp_path, *params: str):
    """`mlflow run .` with `params` (and CLASSES, templates=photo) into a fresh store: the one
    registered version and its run."""
    from mlflow.tracking import MlflowClient

    uri = fresh_sqlite_uri(tmp_path / "mlflow.db")
    argv = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local"]
    for param in (*params, "classes=" + ",".join(CLASSES), "templates=photo"):
        argv += ["-P", param]
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='clip-zero-shot'")
    return version, client.get_run(version.run_id)


@pytest.mark.slow
def test_mlflow_run_exports_an_open_clip_checkpoint(small_checkpoint, tmp_path):
    version, run = _mlflow_run(tmp_path, "model=open_clip:ViT-S-32", f"checkpoint={small_checkpoint}")
    assert (version.tags["source"], version.tags["architecture"]) == ("open_clip", "ViT-S-32")
    metrics = run.data.metrics
    assert metrics["parity_max_abs_prob_diff"] <= 1e-5 and metrics["parity_max_abs_pixel_diff"] == 0.0
    assert metrics["parity_token_mismatches"] == 0.0
