"""The model card: what the export writes on a registered version and on its registered model,
the lines promotion and rollback append, and MLflow's 5,000-character description limit."""

from __future__ import annotations

import pytest
from helpers import ROOT, requires_export, using_store
from stores import fresh_sqlite_uri

from mlflow_clip.registry.card import (
    HISTORY_HEADING,
    MAX_DESCRIPTION_CHARS,
    alias_line,
    version_card,
    with_line,
)

CONFIG = {
    "clip_model": "RN50",
    "classes": ["a forklift", "a pallet", "a person"],
    "templates": "photo",
    "template_texts": ["a photo of {}."],
    "precision": "int8",
    "precision_method": "int8-static-qdq",
    "int8_kernels": "avx2",
    "input_resolution": 224,
}


def test_the_card_names_the_model_classes_parity_and_how_to_serve_it():
    parity = {"parity_max_abs_prob_diff": 3.2e-3, "parity_top1_agreement": 1.0, "parity_max_abs_pixel_diff": 0.0}
    gates = {"max_prob_diff": 5e-2, "min_top1_agreement": 0.99, "max_pixel_diff": 0.0}
    card = version_card("clip-zero-shot", "7", CONFIG, parity, gates, {"model.onnx": 25.61}, "abc123", "OpenAI's")
    # MLflow's versions table shows the start of the description as plain text: no Markdown there
    assert card.splitlines()[0] == (
        "RN50, 3 classes, int8: a CLIP zero-shot classifier exported by mlflow-clip; matches PyTorch "
        "(largest probability difference 3.2e-03, gate 5e-02)"
    )
    assert (
        "`a forklift`, `a pallet`, `a person`" in card and "int8 (int8-static-qdq), gated on avx2 int8 kernels" in card
    )
    assert "| largest probability difference | 3.20e-03 | 5.00e-02 |" in card
    assert "| top-1 agreement | 100.00% | 99.00% |" in card
    assert "model.onnx 25.6 MB" in card and "`abc123`" in card
    commands = card.split("```bash\n")[1].split("```")[0].splitlines()
    assert commands[:2] == ["mlflow models serve -m models:/clip-zero-shot/7 \\", "  --env-manager local -p 5001 &"]
    assert commands[-2:] == [
        "python examples/query_server.py http://127.0.0.1:5001 \\",
        "  photo.jpg  # any image of yours",
    ]


def test_the_demo_models_card_queries_an_image_it_shows_how_to_make_and_fits_the_uis_width():
    """The commands are the README's first serve and query, each line within the 64 characters
    the MLflow UI's description box shows without scrolling (1400 px window, assistant open)."""
    card = version_card("clip-zero-shot", "1", {**CONFIG, "clip_model": "demo"}, {"parity_max_abs_prob_diff": 1e-6})
    commands = card.split("```bash\n")[1].split("```")[0].splitlines()
    assert "python examples/make_demo_images.py demo-images" in commands
    assert commands[-1] == '  "demo-images/a red circle/0001.png"'
    assert max(len(line) for line in commands) <= 64, commands
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "mlflow models serve -m models:/clip-zero-shot/1 --env-manager local -p 5001 &" in readme
    assert "python examples/make_demo_images.py demo-images" in readme


def test_a_thousand_classes_fit_with_room_for_the_alias_lines():
    config = {**CONFIG, "classes": [f"class number {i} with a long name" for i in range(1000)]}
    card = version_card("clip-zero-shot", "1", config)
    assert len(card) <= MAX_DESCRIPTION_CHARS - 1500 and "and 960 more" in card


def test_lines_are_appended_and_the_oldest_folded_at_the_limit():
    description = "### my card\n\nwritten by hand"
    for i in range(300):
        line = alias_line(
            f"2026-12-01T10:{i % 60:02d}:00Z",
            "production",
            "promoted to this version",
            "alice",
            f"was {i}",
            {"checksum": True, "accuracy": i % 2 == 0},
            "run1",
        )
        description = with_line(description, line, "clip-zero-shot")
        assert len(description) <= MAX_DESCRIPTION_CHARS
    assert description.startswith("### my card\n\nwritten by hand\n\n" + HISTORY_HEADING)
    assert description.count(HISTORY_HEADING) == 1 and "earlier entries folded" in description
    assert description.rstrip().endswith("(was 299) by alice; gates passed: checksum; failed: accuracy; run `run1`")


@pytest.fixture(scope="module")
def registry(module_tmp):
    import mlflow

    from mlflow_clip.export.job import export_and_register

    root = module_tmp("card")
    uri = fresh_sqlite_uri(root / "mlflow.db")
    with using_store(uri):
        experiment = mlflow.create_experiment("c", artifact_location=(root / "a").as_uri())
        versions = []
        for templates in ("photo", "none"):
            with mlflow.start_run(experiment_id=experiment):
                result = export_and_register(
                    ["a red circle", "a blue square"], model="demo", templates=templates, registered_model_name="cards"
                )
                versions.append(result.model_version)
        yield uri, versions


@requires_export
def test_export_writes_the_cards_and_promotion_appends_to_them(registry):
    from mlflow import MlflowClient

    from mlflow_clip.registry import promote, rollback

    uri, (v1, v2) = registry
    with using_store(uri):
        client = MlflowClient()
        model = client.get_registered_model("cards")
        assert "`@challenger` names the candidate" in model.description
        client.update_registered_model("cards", description="our own words")  # never overwritten later
        first = client.get_model_version("cards", v1).description
        assert "demo weights shipped with mlflow-clip" in first and "#### Parity against PyTorch" in first
        assert first.startswith("demo, 2 classes, fp32: a CLIP zero-shot classifier exported by mlflow-clip; matches")
        run = client.get_run(client.get_model_version("cards", v1).run_id)
        assert run.data.tags["mlflow.note.content"] == (
            first.splitlines()[0] + f".\n\nRegistered as [cards version {v1}](#/models/cards/versions/{v1}), whose "
            "card has the figures and how to serve it."
        )
        assert "| largest probability difference |" in first and "text_encoder.onnx" in first
        promote("cards", v1, "production")
        promote("cards", v2, "production")
        rollback("cards", "production")
        lines = {v: client.get_model_version("cards", v).description.split(HISTORY_HEADING)[1] for v in (v1, v2)}
        assert client.get_registered_model("cards").description == "our own words"
    assert lines[v1].count("@production promoted to this version") == 1
    assert f"@production rolled back to this version (from {v2})" in lines[v1]
    assert f"@production promoted to this version (was {v1})" in lines[v2]
    assert f"@production rolled back from this version (to {v1})" in lines[v2]
    assert "by " in lines[v2] and "gates passed: version exists, checksum, parity, loads and predicts" in lines[v2]
