"""Hugging Face CLIPModel folders (`-P model=hf:<folder>`): the folder checked before torch loads,
its processor's pixels and its tokenizer's ids reproduced exactly, the parity gates met against
the folder's own CLIPModel, and the exported model served torch-free. Random weights from a
CLIPConfig, saved with save_pretrained, and a tokenizer built from CLIP's vocabulary; no network."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import BLOCK_TORCH, ROOT, exported_in_store, family_export, has_module, requires_export, subprocess_env
from stores import fresh_sqlite_uri

from mlflow_clip.export.sources import SourceError, parse_model_source

requires_transformers = pytest.mark.skipif(
    not has_module("transformers"), reason="needs the sources extra: pip install '.[sources]'"
)
pytestmark = [requires_export, requires_transformers]

CLASSES = ["a red circle", "a green square", "a blue triangle"]
BLOCK_SOURCES = BLOCK_TORCH.replace('"clip"}', '"clip", "open_clip", "timm", "transformers"}')
# A small CLIPModel (the layout of ViT-B/32, narrower and shallower) for the fast tests.
SMALL_VISION = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2, "num_hidden_layers": 2,
                "image_size": 64, "patch_size": 16}  # fmt: skip
SMALL_TEXT = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2}


def _save_folder(path, seed=1, vision=SMALL_VISION, text=SMALL_TEXT, projection_dim=64):
    from mlflow_clip.export.hf_source import save_random_hf_clip
    from mlflow_clip.package_data import default_vocab_path

    return save_random_hf_clip(path, default_vocab_path(), seed, vision, text, projection_dim)


@pytest.fixture(scope="module")
def small_folder(module_tmp):
    return _save_folder(module_tmp("hf") / "clip-small")


def _rewrite_json(path, update):
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data))


# The folder, checked torch-free before anything loads.


def test_hf_spec_is_parsed_with_its_folder_and_architecture(small_folder):
    source = parse_model_source(f"hf:{small_folder}")
    assert (source.kind, source.folder, source.activation) == ("hf", str(small_folder), "QuickGELU")
    assert source.architecture.startswith("ViT-w128-16 (patch 16, 64 px, 2x128 vision, 2x128 text)")
    assert source.name == "hf:clip-small"


@pytest.mark.parametrize(
    "breakage, words",
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        # a CLIPModel folder relabelled SigLIP: its processor crops, where SigLIP's resizes the whole image
        (lambda f: _rewrite_json(f / "config.json", lambda c: c.update(model_type="siglip")), "crops"),
        (lambda f: (f / "model.safetensors").unlink(), "model.safetensors"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
        (lambda f: (f / "processor_config.json").unlink(), "no image processor settings"),
        (
            lambda f: _rewrite_json(f / "processor_config.json", lambda c: c["image_processor"].update(resample=0)),
            "PIL filter 0",
        ),
        (
            lambda f: _rewrite_json(
                f / "processor_config.json", lambda c: c["image_processor"].update(size={"height": 64, "width": 64})
            ),
            "shortest_edge",
        ),
        (
            lambda f: _rewrite_json(f / "config.json", lambda c: c["vision_config"].update(hidden_act="relu")),
            "hidden_act='relu'",
        ),
        (
            lambda f: _rewrite_json(f / "config.json", lambda c: c["vision_config"].update(num_attention_heads=4)),
            "64 wide",
        ),
    ],
)
def test_bad_folders_are_one_line_errors_naming_the_problem(small_folder, tmp_path, breakage, words):
    import shutil

    folder = shutil.copytree(small_folder, tmp_path / "broken")
    breakage(folder)
    with pytest.raises(SourceError) as raised:
        parse_model_source(f"hf:{folder}")
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_missing_folder_and_a_checkpoint_given_are_refused(tmp_path, small_folder):
    with pytest.raises(SourceError, match="no folder exists"):
        parse_model_source(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(SourceError, match="Leave checkpoint out"):
        parse_model_source(f"hf:{small_folder}", str(small_folder / "model.safetensors"))


def test_a_bad_folder_is_refused_before_torch_is_imported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        from mlflow_clip.export.spec import ExportSpec
        from mlflow_clip.export.sources import SourceError
        try:
            ExportSpec.create("a,b", model="hf:{tmp_path}")
        except SourceError as e:
            print("REFUSED", e)
        assert not any(m.split(".")[0] in {{"torch", "open_clip", "transformers"}} for m in sys.modules)
        """
    )
    path = tmp_path / "check.py"
    path.write_text(script)
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED" in result.stdout and "NaFlex" in result.stdout


# Hugging Face's pixels and ids, reproduced torch-free.


def _odd_size_images():
    from PIL import Image

    from mlflow_clip.export.parity import load_sample_images

    rng = np.random.default_rng(3)
    images = [image for _, image in load_sample_images()]
    # 303x224 at 224 px, 97x64 at 64 px: the resized side minus the crop is 3 mod 4, where a
    # floored and a half-to-even crop offset differ by one pixel.
    for size in ((303, 224), (224, 303), (97, 64), (64, 97), (641, 480), (1001, 333), (37, 200)):
        images.append(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))
    return images


@pytest.mark.parametrize("resolution, resample", [(224, 3), (64, 3), (224, 2)])
@pytest.mark.parametrize("native", [True, False])
def test_preprocessing_equals_clip_image_processor_pil_bit_for_bit(resolution, resample, native):
    from transformers import CLIPImageProcessorPil

    from mlflow_clip.serving.preprocess import CENTER_CROP, FLOOR_CENTER_CROP, Preprocessor, native_status

    if native and not native_status().available:
        pytest.skip("the native pass is not available here")
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution}, resample=resample
    )
    interpolation = {3: "bicubic", 2: "bilinear"}[resample]
    ours = Preprocessor(resolution, resample=interpolation, resize_mode=FLOOR_CENTER_CROP, native=native)
    torchvision_crop = Preprocessor(resolution, resample=interpolation, resize_mode=CENTER_CROP, native=native)
    worst, crop_matters = 0.0, False
    for image in _odd_size_images():
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
        worst = max(worst, float(np.abs(theirs - ours(image)).max()))
        crop_matters |= bool(np.abs(theirs - torchvision_crop(image)).max() > 0.1)
    assert worst == 0.0
    assert crop_matters  # the floored crop is what makes them equal


def _tokenizer_corpus() -> list[str]:
    spec = importlib.util.spec_from_file_location("_tokenizer_corpus", ROOT / "tests/serving/test_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.varied_texts()


@pytest.mark.parametrize("context_length", [77, 16])
def test_torch_free_tokenizer_gives_hugging_faces_ids_on_the_tokenizer_corpus(small_folder, context_length):
    from transformers import CLIPTokenizer

    from mlflow_clip.package_data import default_vocab_path
    from mlflow_clip.serving.tokenizer import ClipTokenizer, TextInputError

    theirs = CLIPTokenizer.from_pretrained(small_folder, local_files_only=True)
    ours = ClipTokenizer.from_file(default_vocab_path(), "hf")
    clip = ClipTokenizer.from_file(default_vocab_path())
    compared = refused = differ_from_clip = 0
    for text in _tokenizer_corpus():
        try:
            expected = theirs([text], padding="max_length", max_length=context_length, truncation=True)["input_ids"]
        except TypeError:  # a lone surrogate: Hugging Face's tokenizer refuses the text, and so do we
            with pytest.raises(TextInputError, match="Text 0 contains a lone surrogate"):
                ours([text], context_length=context_length)
            refused += 1
            continue
        got = ours([text], context_length=context_length)
        assert got.tolist() == expected, text
        compared += 1
        differ_from_clip += int((clip([text], context_length=context_length) != got).any())
    assert compared > 1300 and refused > 0
    # Hugging Face's ids are not CLIP's (no ftfy, no HTML unescaping, padding with the end token).
    assert differ_from_clip > 500


# The export, its gates, and the model served torch-free.


@pytest.fixture(scope="module")
def small_export(small_folder, module_tmp):
    with exported_in_store(
        module_tmp("store"), "hf", "hf-small", classes=CLASSES, model=f"hf:{small_folder}", templates="photo"
    ) as exported:
        yield exported


@family_export
def test_hf_export_meets_every_parity_gate_against_the_folders_own_model(small_export):
    result, run, version, _ = small_export
    metrics = result.metrics
    assert metrics["parity_max_abs_prob_diff"] <= 1e-5
    assert metrics["parity_max_abs_pixel_diff"] == 0.0
    assert metrics["parity_token_mismatches"] == 0.0
    assert metrics["parity_top1_agreement"] == 1.0
    assert metrics["parity_max_abs_text_embedding_diff"] <= 1e-5
    params = run.data.params
    assert (params["source"], params["activation"], params["tokenizer"]) == ("hf", "QuickGELU", "hf")
    assert (
        params["parity_reference"].startswith("transformers 5.")
        and "CLIPImageProcessorPil" in params["parity_reference"]
    )
    assert version.tags["source"] == "hf" and version.tags["clip_model"] == "hf:clip-small"
    assert version.tags["architecture"].startswith("ViT-w128-16")


@family_export
def test_the_contract_records_hugging_faces_crop_and_tokenizer(small_export):
    import yaml

    _, _, _, local = small_export
    with open(f"{local}/clip_classifier.json") as f:
        config = json.load(f)
    assert config["resize_mode"] == "shortest_side_then_floor_center_crop"
    assert config["tokenizer"] == "hf" and config["input_resolution"] == 64
    assert config["clip_version"].startswith("transformers 5.")
    assert config["logit_scale"] == pytest.approx(100.0, rel=1e-5)  # read from the folder's weights
    with open(f"{local}/MLmodel") as f:
        flavor = yaml.safe_load(f)["flavors"]["mlflow_clip"]
    assert flavor["manifest"]  # the contract's files, verified at load


@family_export
def test_the_exported_model_predicts_like_the_folders_own_model_torch_free(small_export, small_folder, tmp_path):
    """Served torch-free (baked classes and per-request labels), against CLIPModel + its
    processor + its tokenizer run in PyTorch here."""
    import io

    import torch
    from PIL import Image
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    _, _, _, local = small_export
    image = Image.new("RGB", (303, 224), (30, 40, 220))
    image.paste((220, 40, 30), (0, 0, 151, 224))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    (tmp_path / "image.png").write_bytes(buffer.getvalue())
    script = BLOCK_SOURCES + textwrap.dedent(
        f"""
        import json, mlflow, pandas as pd
        frame = pd.DataFrame({{"image": [open({str(tmp_path / "image.png")!r}, "rb").read()]}})
        model = mlflow.pyfunc.load_model({str(local)!r})
        baked = model.predict(frame)
        params = {{"classes": ["a photo of a cat.", "a photo of a dog."], "templates": "none"}}
        labels = model.predict(frame, params=params)
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
    _, per_request = json.loads(result.stdout.split("OUT ", 1)[1])
    model = CLIPModel.from_pretrained(small_folder, local_files_only=True).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(small_folder)(images=image, return_tensors="pt")["pixel_values"]
    texts = CLIPTokenizer.from_pretrained(small_folder)(
        ["a photo of a cat.", "a photo of a dog."], padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(pixel_values=pixels, **texts).logits_per_image.softmax(-1)[0].numpy()
    np.testing.assert_allclose(per_request, expected, atol=1e-5)


def test_gelu_towers_are_converted_with_gelu(tmp_path):
    from mlflow_clip.export.job import build_classifier, check_parity
    from mlflow_clip.export.spec import ParityThresholds

    vision, text = {**SMALL_VISION, "hidden_act": "gelu"}, {**SMALL_TEXT, "hidden_act": "gelu"}
    folder = _save_folder(tmp_path / "gelu", seed=2, vision=vision, text=text)
    built = build_classifier(CLASSES, model=f"hf:{folder}", templates="photo", out_dir=tmp_path / "out")
    report, failures = check_parity(built, None, ParityThresholds(max_prob_diff=1e-5))
    assert failures == [] and built.loaded.details["activation"] == "GELU"
    assert report.max_abs_embedding_diff <= 1e-5


# ViT-B/32 dimensions through the real `mlflow run` (slow).


@pytest.mark.slow
def test_mlflow_run_exports_a_vit_b_32_hugging_face_folder(tmp_path):
    from mlflow.tracking import MlflowClient

    folder = _save_folder(tmp_path / "clip-vit-base-patch32", vision={}, text={}, projection_dim=512)
    uri = fresh_sqlite_uri(tmp_path / "mlflow.db")
    argv = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local"]
    for param in (f"model=hf:{folder}", "classes=" + ",".join(CLASSES), "registered_model_name=clip-hf"):
        argv += ["-P", param]
    result = subprocess.run(
        argv, cwd=tmp_path, env=subprocess_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='clip-hf'")
    assert version.tags["source"] == "hf"
    assert version.tags["architecture"] == "ViT-B-32 (patch 32, 224 px, 12x768 vision, 12x512 text)"
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["parity_max_abs_prob_diff"] <= 1e-5 and metrics["parity_max_abs_pixel_diff"] == 0.0
    assert metrics["parity_token_mismatches"] == 0.0 and metrics["parity_max_abs_text_embedding_diff"] <= 1e-5


def test_openai_weights_written_as_a_hugging_face_folder_load_back_value_for_value(tmp_path):
    """The benchmark's peers get row (a)'s weights in CLIPModel's layout: the same features, and
    converting back gives OpenAI's tensors exactly."""
    import torch
    from transformers import CLIPModel

    from mlflow_clip.export.checkpoints import load_clip
    from mlflow_clip.export.hf_source import convert_to_openai_layout, save_openai_as_hf
    from mlflow_clip.package_data import default_vocab_path

    model = load_clip("demo").model
    folder = save_openai_as_hf(model, tmp_path / "demo-hf", default_vocab_path())
    hf = CLIPModel.from_pretrained(folder).eval()
    pixels = torch.randn(2, 3, model.visual.input_resolution, model.visual.input_resolution)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
    with torch.no_grad():
        image_diff = (model.encode_image(pixels) - hf.get_image_features(pixel_values=pixels).pooler_output).abs()
        text_diff = (model.encode_text(ids) - hf.get_text_features(input_ids=ids).pooler_output).abs()
    assert float(image_diff.max()) <= 1e-5 and float(text_diff.max()) <= 1e-5
    back = convert_to_openai_layout(hf).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value.float()), key
