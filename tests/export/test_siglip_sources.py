"""SigLIP, SigLIP 2 and multilingual text towers: open_clip's (`open_clip:<architecture>` with a
checkpoint and a tokenizer folder, or `open_clip:local-dir:<folder>`) and Hugging Face
`SiglipModel` folders (`hf:<folder>`). Spec checks before torch loads, SigLIP's head and
preprocessing, the gates met against each source's own PyTorch model, and the models served
torch-free with per-request labels in several scripts. Random weights from each source's own
constructors and tokenizers trained here on a few hundred lines (tests/source_models.py); no network."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import BLOCK_TORCH, ROOT, exported_in_store, family_export, has_module, requires_export, subprocess_env
from stores import fresh_sqlite_uri

from mlflow_clip.errors import MlflowClipError
from mlflow_clip.export.sources import SourceError, parse_model_source
from mlflow_clip.export.spec import ExportSpec

pytestmark = [
    requires_export,
    pytest.mark.skipif(
        not all(has_module(m) for m in ("open_clip", "transformers", "sentencepiece", "tokenizers")),
        reason="needs the sources extra: pip install '.[sources]'",
    ),
]

CLASSES = ["a red circle", "a green square", "a blue triangle"]
# Per-request labels in several scripts: Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari, CJK, Thai.
LABELS = ["a cat", "кошка", "γάτα", "قطة", "חתול", "बिल्ली", "猫", "แมว"]
BLOCK_SOURCES = BLOCK_TORCH.replace(
    '"clip"}', '"clip", "open_clip", "timm", "transformers", "sentencepiece_model_pb2", "safetensors"}'
)


@pytest.fixture(scope="module")
def folders(module_tmp):
    """Small models of each family, built once per module."""
    import source_models as models

    root = module_tmp("siglip-sources")
    siglip = root / "tiny-siglip"
    tokenizer = models.tokenizer_folder(siglip, "t5")
    models.local_dir(siglip, models.small_siglip_config(len(tokenizer)), models.SQUASH_PREPROCESS)
    xlmr = root / "tiny-xlmr"
    tokenizer = models.tokenizer_folder(xlmr, "xlmr")
    models.hf_text_config(xlmr, "xlmr", len(tokenizer))
    models.local_dir(xlmr, models.small_hf_text_config("xlmr"))
    return {
        "siglip": siglip,
        "xlmr": xlmr,
        "hf-siglip": models.hf_siglip_folder(root / "hf-siglip", "siglip"),
        "hf-gemma": models.hf_siglip_folder(root / "hf-gemma", "gemma"),
    }


# The spec, checked torch-free before anything loads.


def test_siglip_and_multilingual_specs_are_parsed_with_their_family_and_tokenizer_folder(folders, tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"not read before torch loads")
    siglip = parse_model_source("open_clip:ViT-B-16-SigLIP", str(weights), str(folders["siglip"]))
    assert (siglip.family, siglip.tokenizer_folder, siglip.name) == (
        "open_clip_text",
        str(folders["siglip"]),
        "open_clip:ViT-B-16-SigLIP",
    )
    assert parse_model_source("open_clip:ViT-B-16-SigLIP2", str(weights), str(folders["siglip"])).family == (
        "open_clip_text"
    )
    multilingual = parse_model_source("open_clip:xlm-roberta-base-ViT-B-32", str(weights), str(folders["xlmr"]))
    assert multilingual.family == "hf_text"
    local = parse_model_source(f"open_clip:local-dir:{folders['siglip']}")
    assert local.checkpoint.endswith("open_clip_pytorch_model.bin") and local.tokenizer_folder == str(folders["siglip"])
    hf = parse_model_source(f"hf:{folders['hf-siglip']}")
    assert (hf.family, hf.name) == ("siglip", "hf:hf-siglip") and hf.architecture.startswith("SigLIP ViT-w64-16")


@pytest.mark.parametrize(
    "model, tokenizer, extra, words",
    [
        ("open_clip:ViT-B-16-SigLIP", "", {}, "pass -P tokenizer=<local folder"),
        ("open_clip:ViT-B-16-SigLIP", "/no/such/folder", {}, "pass -P tokenizer=<local folder"),
        ("open_clip:xlm-roberta-base-ViT-B-32", "SIGLIP", {}, "has no config.json"),
        ("open_clip:ViT-B-32", "SIGLIP", {}, "Leave tokenizer out"),
        ("open_clip:ViT-B-16-SigLIP-quickgelu", "SIGLIP", {}, "Leave -quickgelu out"),
        ("open_clip:ViT-L-14-CLIPA", "SIGLIP", {}, "strip_sep_token"),
        ("open_clip:coca_roberta-ViT-B-32", "SIGLIP", {}, "CoCa"),
        ("open_clip:EVA02-B-16", "", {}, "custom text tower"),
        ("RN50", "SIGLIP", {}, "tokenizer goes with open_clip"),
        ("open_clip:ViT-B-32", "", {"head": "sigmoid"}, "head=sigmoid"),
        ("open_clip:ViT-B-16-SigLIP", "SIGLIP", {"head": "tanh"}, "expected one of softmax, sigmoid"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_fix(folders, tmp_path, model, tokenizer, extra, words):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    tokenizer = str(folders["siglip"]) if tokenizer == "SIGLIP" else tokenizer
    checkpoint = None if model == "RN50" else str(weights)
    with pytest.raises(MlflowClipError, match=words) as info:
        ExportSpec.create("a,b", model=model, checkpoint=checkpoint, tokenizer=tokenizer or None, **extra)
    assert "\n" not in str(info.value)


def test_hugging_face_folders_that_cannot_be_followed_are_refused(folders, tmp_path):
    import shutil

    naflex = shutil.copytree(folders["hf-siglip"], tmp_path / "naflex")
    config = json.loads((naflex / "config.json").read_text())
    (naflex / "config.json").write_text(json.dumps({**config, "model_type": "siglip2"}))
    with pytest.raises(SourceError, match="NaFlex"):
        parse_model_source(f"hf:{naflex}")
    cropped = shutil.copytree(folders["hf-siglip"], tmp_path / "cropped")
    settings = json.loads((cropped / "processor_config.json").read_text())
    settings["image_processor"]["size"] = {"height": 32, "width": 32}
    (cropped / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(SourceError, match="not the model's 64 px square"):
        parse_model_source(f"hf:{cropped}")


# Preprocessing and tokenizers: each source's own, reproduced exactly.


@pytest.mark.parametrize("native", [True, False], ids=["native", "pillow"])
def test_preprocessing_equals_open_clips_and_hugging_faces_siglip_transforms(native):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image
    from transformers import SiglipImageProcessorPil

    from mlflow_clip.export.parity import load_sample_images
    from mlflow_clip.serving.preprocess import SQUASH, Preprocessor

    rng = np.random.default_rng(4)
    images = [image for _, image in load_sample_images()]
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(301, 97), (97, 640)]]
    for size in (224, 256, 384):
        ours = Preprocessor(size, (0.5,) * 3, (0.5,) * 3, "bicubic", SQUASH, native=native).batch(images)
        cfg = PreprocessCfg(size=size, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
        open_clip_pixels = np.stack([image_transform_v2(cfg, is_train=False)(image).numpy() for image in images])
        hf = SiglipImageProcessorPil(size={"height": size, "width": size})
        assert np.abs(ours - open_clip_pixels).max() == 0.0
        assert np.abs(ours - hf(images=images, return_tensors="np")["pixel_values"]).max() == 0.0


@pytest.fixture(scope="module")
def exports(folders, module_tmp):
    """Each family exported and registered once, each into its own store (the Hugging Face
    folder at int8): (result, run, version, local model folder) per family."""
    built = {}
    for family, model, precision in [
        ("siglip", f"open_clip:local-dir:{folders['siglip']}", "fp32"),
        ("xlmr", f"open_clip:local-dir:{folders['xlmr']}", "fp32"),
        ("hf-siglip", f"hf:{folders['hf-siglip']}", "int8"),
    ]:
        store = module_tmp(f"store-{family}")
        with exported_in_store(
            store, family, family, classes=CLASSES, templates="photo", model=model, precision=precision
        ) as (result, run, version, local):
            built[family] = (result, run, version, Path(local))
    return built


@family_export
@pytest.mark.parametrize(
    "family, head, tokenizer, pooling, resize_mode",
    [
        ("siglip", "sigmoid", "tokenizers", "full", "squash"),
        ("xlmr", "softmax", "tokenizers", "masked", "shortest_side_then_center_crop"),
        ("hf-siglip", "sigmoid", "sentencepiece", "full", "squash"),
    ],
)
def test_each_family_meets_every_gate_and_records_its_head_and_tokenizer(
    exports, family, head, tokenizer, pooling, resize_mode
):
    result, run, version, local = exports[family]
    metrics = result.metrics
    gate = 0.1 if family == "hf-siglip" else 1e-5  # int8 for the Hugging Face folder, fp32 for the others
    assert metrics["parity_max_abs_prob_diff"] <= gate
    assert metrics["parity_max_abs_pixel_diff"] == 0.0 and metrics["parity_top1_agreement"] == 1.0
    assert metrics["parity_token_mismatches"] == 0.0 and metrics["parity_max_abs_text_embedding_diff"] <= 1e-5
    assert {k: version.tags[k] for k in ("head", "tokenizer", "parity_status")} == {
        "head": head,
        "tokenizer": tokenizer,
        "parity_status": "passed",
    }
    assert version.tags["source"] == ("hf" if family == "hf-siglip" else "open_clip")
    conf = _flavor_conf(local)
    assert (conf["head"], conf["tokenizer"]) == (head, tokenizer)
    config = json.loads((local / "clip_classifier.json").read_text(encoding="utf-8"))
    assert (config["text_pooling"], config["resize_mode"], config["head"]) == (pooling, resize_mode, head)
    assert (config["logit_bias"] != 0.0) == (head == "sigmoid")
    tokenizer_file = conf["tokenizer_vocab"]
    assert tokenizer_file in conf["manifest"]["files"]  # the tokenizer's own files are covered
    assert "bpe_simple_vocab_16e6.txt.gz" not in conf["manifest"]["files"]
    assert tokenizer in (local / "requirements.txt").read_text(encoding="utf-8")


def _flavor_conf(local) -> dict:
    import yaml

    with open(f"{local}/MLmodel", encoding="utf-8") as f:
        return yaml.safe_load(f)["flavors"]["mlflow_clip"]


@family_export
def test_sigmoid_scores_are_each_class_on_its_own_and_match_the_source_model(exports, folders):
    """The served sigmoid head against open_clip's own model: logit_scale * cosine + logit_bias,
    one sigmoid per class (rows do not sum to 1), baked classes and per-request labels alike."""
    import io

    import open_clip
    import torch
    from PIL import Image

    from mlflow_clip.flavor import load_model

    _, _, _, local = exports["siglip"]
    classifier = load_model(str(local))
    image = Image.new("RGB", (120, 90), (30, 40, 220))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    served = classifier.predict([buffer.getvalue()])
    per_request = classifier.predict([buffer.getvalue()], classes=CLASSES, templates=["a photo of a {}."])
    model = open_clip.create_model(f"local-dir:{folders['siglip']}", device="cpu").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folders['siglip']}")
    cfg = open_clip.transform.PreprocessCfg(**model.visual.preprocess_cfg)
    pixels = open_clip.transform.image_transform_v2(cfg, is_train=False)(image)[None]
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES]), normalize=True)
        expected = torch.sigmoid(image_features @ text_features.T * model.logit_scale.exp() + model.logit_bias)
    np.testing.assert_allclose(served["probabilities"][0], expected[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(per_request["probabilities"][0], expected[0].numpy(), atol=1e-5)
    assert abs(float(np.sum(served["probabilities"][0])) - 1.0) > 1e-3


@family_export
@pytest.mark.parametrize("family", ["siglip", "xlmr", "hf-siglip"])
def test_served_torch_free_with_per_request_labels_in_several_scripts(exports, family, tmp_path):
    _, _, _, local = exports[family]
    script = BLOCK_SOURCES + textwrap.dedent(
        f"""
        import io, json, mlflow, pandas as pd
        from PIL import Image
        buffer = io.BytesIO()
        Image.new("RGB", (120, 90), (30, 40, 220)).save(buffer, format="PNG")
        frame = pd.DataFrame({{"image": [buffer.getvalue()]}})
        model = mlflow.pyfunc.load_model({str(local)!r})
        baked = model.predict(frame)
        labels = model.predict(frame, params={{"classes": {LABELS!r}, "templates": "{{}}"}})
        texts = model.predict(pd.DataFrame({{"text": {LABELS!r}}}))
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("OUT", json.dumps([list(baked["probabilities"][0]), labels["label"][0], list(labels["probabilities"][0]),
                                 [list(e) for e in texts["embedding"]]]))
        """
    )
    path = tmp_path / "serve.py"
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    baked, label, per_request, embeddings = json.loads(result.stdout.split("OUT ", 1)[1])
    assert len(baked) == len(CLASSES) and len(per_request) == len(LABELS) and label in LABELS
    embeddings = np.asarray(embeddings)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(e, 5)) for e in embeddings}) == len(LABELS)  # each script its own embedding


# The real `mlflow run`, full size (slow): one SigLIP, one multilingual architecture.


def _mlflow_run(tmp_path, *params: str):
    from mlflow.tracking import MlflowClient

    uri = fresh_sqlite_uri(tmp_path / "mlflow.db")
    argv = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local"]
    for param in (*params, "classes=" + ",".join(CLASSES), "templates=photo"):
        argv += ["-P", param]
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='clip-zero-shot'")
    return version, client.get_run(version.run_id)


@pytest.mark.slow
@pytest.mark.parametrize(
    "architecture, layout",
    [("ViT-B-16-SigLIP", "t5"), ("xlm-roberta-base-ViT-B-32", "xlmr")],
)
def test_mlflow_run_exports_a_full_size_architecture(architecture, layout, tmp_path):
    """The published architecture, full size, random weights, through `mlflow run .`."""
    import source_models as models

    folder = tmp_path / "tokenizer"
    tokenizer = models.tokenizer_folder(folder, layout)
    text_cfg = None
    if layout == "xlmr":  # xlm-roberta-base's dimensions, with the trained tokenizer's vocabulary
        models.hf_text_config(folder, "xlmr", len(tokenizer), seed_width=768)
        config = json.loads((folder / "config.json").read_text())
        config.update(num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514)
        (folder / "config.json").write_text(json.dumps(config))
        text_cfg = {"hf_model_name": str(folder), "hf_tokenizer_name": "xlm-roberta-base",
                    "hf_pooler_type": "mean_pooler", "hf_model_pretrained": False}  # fmt: skip
    checkpoint = models.save_open_clip_checkpoint(architecture, tmp_path / "weights.bin", text_cfg)
    version, run = _mlflow_run(
        tmp_path, f"model=open_clip:{architecture}", f"checkpoint={checkpoint}", f"tokenizer={folder}",
        "max_prob_diff=1e-5",
    )  # fmt: skip
    metrics = run.data.metrics
    assert metrics["parity_max_abs_prob_diff"] <= 1e-5 and metrics["parity_max_abs_pixel_diff"] == 0.0
    assert metrics["parity_token_mismatches"] == 0.0 and metrics["parity_max_abs_text_embedding_diff"] <= 1e-5
    assert version.tags["head"] == ("sigmoid" if "SigLIP" in architecture else "softmax")
    assert (version.tags["tokenizer"], version.tags["parity_status"]) == ("tokenizers", "passed")
