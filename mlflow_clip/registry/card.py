"""The model card: the Markdown description of a registered version, and of its registered model.

The export writes the version's card (the CLIP model and where its weights came from, classes,
templates, precision, the parity figures against their gates, sizes, and the commands to serve
and query it) and, when the registered model has no description yet, the registered model's.
Promotion and rollback append one line each to the description of the version they move the
alias to, never rewriting what is there (a user's own edits included). MLflow stores
descriptions in 5,000 characters: the card lists at most `MAX_LISTED_CLASSES` classes, and when
appended lines would overflow, the oldest lines are folded into one that points at
`mlflow-clip history`, which keeps every record.

The card opens with a one-line summary (MLflow's versions table shows the start of the
description as plain text), which is also the export run's description, with a link to the
version. Its commands are the README's first serve and query, in lines short enough for the
MLflow UI's description box.

    >>> card = version_card("clip-zero-shot", "3", {"clip_model": "RN50", "classes": ["a cat", "a dog"]})
    >>> card.splitlines()[0]
    'RN50, 2 classes, fp32: a CLIP zero-shot classifier exported by mlflow-clip'
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Mapping

from mlflow import MlflowClient

from mlflow_clip.gateway import DEFAULT_PORT

MAX_DESCRIPTION_CHARS = 5000  # MLflow's column for model and version descriptions
MAX_LISTED_CLASSES = 40
DEMO_MODEL = "demo"
SERVE_PORT = DEFAULT_PORT  # the README's first `mlflow models serve`, and mlflow-clip serve's
RUN_DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's description
HISTORY_HEADING = "#### Aliases"
_FOLDED = "- (earlier entries folded: `mlflow-clip history --model-name {name} --alias ALIAS` lists every one)"
# Parity figures: metric name (without `parity_`), label, the ParityThresholds field gating it, format
PARITY_ROWS = (
    ("max_abs_prob_diff", "largest probability difference", "max_prob_diff", "{:.2e}"),
    ("max_abs_logit_diff", "largest logit difference", "max_logit_diff", "{:.2e}"),
    ("top1_agreement", "top-1 agreement", "min_top1_agreement", "{:.2%}"),
    ("max_abs_pixel_diff", "largest preprocessing difference (0-255)", "max_pixel_diff", "{:g}"),
    ("max_abs_text_embedding_diff", "text encoder: largest embedding difference", "max_text_embedding_diff", "{:.2e}"),
)


def version_card(
    name: str,
    version: str,
    config: Mapping[str, Any],
    parity: Mapping[str, float] | None = None,
    thresholds: Mapping[str, float] | None = None,
    sizes_mb: Mapping[str, float] | None = None,
    run_id: str = "",
    source: str = "",
) -> str:
    """The Markdown card of `name` version `version`, from its classifier config (classes,
    clip_model, templates, precision, input_resolution, ...), the export's parity metrics and
    gates, and file sizes."""
    classes = list(config.get("classes", []))
    listed = ", ".join(f"`{c}`" for c in classes[:MAX_LISTED_CLASSES])
    more = (
        f" and {len(classes) - MAX_LISTED_CLASSES} more (all in the run's `classes.json`)"
        if len(classes) > MAX_LISTED_CLASSES
        else ""
    )
    lines = [
        summary(config, parity, thresholds),
        "",
        f"- **CLIP model**: `{config.get('clip_model', '?')}`" + (f" ({source})" if source else ""),
        f"- **Precision**: {config.get('precision', 'fp32')}"
        + (f" ({config['precision_method']})" if config.get("precision_method") else "")
        + (f", gated on {config['int8_kernels']} int8 kernels" if config.get("int8_kernels") else ""),
        f"- **Templates**: {config.get('templates', 'none')} ({len(config.get('template_texts', ['{}']))} per class)",
        f"- **Input**: {config.get('input_resolution', '?')} px, {config.get('interpolation', 'bicubic')} resize of "
        "the short side, centre crop",
        f"- **Classes**: {listed}{more}",
    ]
    if sizes_mb:
        lines.append("- **Size**: " + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes_mb.items()))
    if run_id:
        lines.append(f"- **Export run**: `{run_id}`")
    lines += _parity_table(parity or {}, thresholds or {})
    lines += _usage(name, version, config)
    return _fit("\n".join(lines))


def _parity_table(parity: Mapping[str, float], thresholds: Mapping[str, float]) -> list[str]:
    rows = []
    for metric, label, gate, fmt in PARITY_ROWS:
        value = parity.get(f"parity_{metric}", parity.get(metric))
        if value is None:
            continue
        limit = thresholds.get(gate)
        rows.append(f"| {label} | {fmt.format(value)} | {'' if limit is None else fmt.format(limit)} |")
    if not rows:
        return []
    return ["", "#### Parity against PyTorch", "", "| figure | measured | gate |", "|---|---:|---:|", *rows]


def summary(
    config: Mapping[str, Any], parity: Mapping[str, float] | None = None, thresholds: Mapping[str, float] | None = None
) -> str:
    """One line: model, classes, precision and the parity result, e.g. `RN50, 4 classes, int8: a
    CLIP zero-shot classifier exported by mlflow-clip; matches PyTorch (largest probability
    difference 3.2e-03, gate 1e-01)`."""
    model, precision, count = (
        config.get("clip_model", "?"),
        config.get("precision", "fp32"),
        len(config.get("classes", [])),
    )
    line = f"{model}, {count} classes, {precision}: a CLIP zero-shot classifier exported by mlflow-clip"
    measured = (parity or {}).get("parity_max_abs_prob_diff", (parity or {}).get("max_abs_prob_diff"))
    if measured is None:
        return line
    gate = (thresholds or {}).get("max_prob_diff")
    return (
        line
        + f"; matches PyTorch (largest probability difference {measured:.1e}"
        + (f", gate {gate:.0e})" if gate is not None else ")")
    )


def run_description(name: str, version: str, line: str) -> str:
    """The export run's description: the card's summary, and a link to the version's page."""
    page = f"#/models/{urllib.parse.quote(name, safe='')}/versions/{version}"
    return (
        f"{line}.\n\nRegistered as [{name} version {version}]({page}), whose card has the figures and how to serve it."
    )


def _usage(name: str, version: str, config: Mapping[str, Any]) -> list[str]:
    """The README's first serve and query, each line short enough for the UI's description box."""
    url = f"http://127.0.0.1:{SERVE_PORT}"
    if config.get("clip_model") == DEMO_MODEL:
        make = ["python examples/make_demo_images.py demo-images"]
        image = '"demo-images/a red circle/0001.png"'
    else:
        make, image = [], "photo.jpg  # any image of yours"
    return [
        "",
        "#### Serve and query",
        "",
        "```bash",
        f"mlflow models serve -m models:/{name}/{version} \\",
        f"  --env-manager local -p {SERVE_PORT} &",
        f"until curl -sf {url}/ping; do sleep 1; done",
        *make,
        f"python examples/query_server.py {url} \\",
        f"  {image}",
        "```",
    ]


def registered_model_card(name: str) -> str:
    """The registered model's description, written once when it has none."""
    return _fit(
        "\n".join(
            [
                f"### {name}",
                "",
                "CLIP zero-shot image classifiers exported to ONNX by mlflow-clip, each version checked against "
                "PyTorch at export (its card lists the figures). `@challenger` names the candidate, `@production` "
                "what serves; `mlflow-clip promote` moves an alias after its gates pass, `mlflow-clip rollback` "
                "moves it back, `mlflow-clip history` lists both.",
                "",
                "```bash",
                f"mlflow-clip promote --model-name {name} --version challenger --alias production",
                f"mlflow-clip serve -m models:/{name}@production -p 5001",
                "```",
            ]
        )
    )


def alias_line(
    at: str,
    alias: str,
    verb: str,
    by: str,
    other: str | None,
    gates: Mapping[str, bool] | None = None,
    run_id: str = "",
) -> str:
    """One line of a version's alias history, e.g.
    `- 2026-12-01T12:00:00Z: @production promoted to this version (was 3) by alice; gates passed: ...`."""
    line = f"- {at}: @{alias} {verb}" + (f" ({other})" if other else "") + f" by {by}"
    if gates:
        passed = [g for g, ok in gates.items() if ok]
        failed = [g for g, ok in gates.items() if not ok]
        line += "; gates passed: " + (", ".join(passed) or "none")
        if failed:
            line += "; failed: " + ", ".join(failed)
    if run_id:
        line += f"; run `{run_id}`"
    return line


def append_line(client: MlflowClient, name: str, version: str, line: str) -> None:
    """Append `line` under the version description's alias heading, folding the oldest lines
    into one when the description would pass MLflow's limit."""
    description = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=with_line(description, line, name))


def with_line(description: str, line: str, name: str) -> str:
    """`description` with `line` appended under its alias heading (added if missing)."""
    body, _, history = description.partition(HISTORY_HEADING)
    folded = _FOLDED.format(name=name)
    entries = [e for e in history.strip().splitlines() if e.startswith("- ") and e != folded] + [line[:600]]
    dropped = folded in history
    while True:
        shown = ([folded] if dropped else []) + entries
        text = body.rstrip() + ("\n\n" if body.strip() else "") + HISTORY_HEADING + "\n\n" + "\n".join(shown)
        if len(text) <= MAX_DESCRIPTION_CHARS or len(entries) == 1:
            return text[:MAX_DESCRIPTION_CHARS]
        entries, dropped = entries[1:], True


def _fit(text: str, limit: int = MAX_DESCRIPTION_CHARS - 1500) -> str:
    """A card within `limit` characters, leaving room for the alias lines appended later."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_new_version(client: MlflowClient, name: str, version: str, card: str) -> None:
    """Write the version's card; the registered model's too when it has no description."""
    client.update_model_version(name, version, description=card)
    if not (client.get_registered_model(name).description or "").strip():
        client.update_registered_model(name, description=registered_model_card(name))
