"""Each export option, written once: its name, default, kind and meaning (`EXPORT_OPTIONS`).

Torch-free, like `spec.py`. Everything else is read from this table: the `mlflow-clip export`
command's options and their `--help`, `ExportSpec.create` (which parses each value, whether it
comes typed from Python or as text from the command line), the signatures `help()` shows for
`export_and_register` and `build_classifier`, and the parameter table of docs/export.md
(`markdown_table`). MLproject stays a file, as MLflow reads it; a test checks its `main` entry
point against this table, and the docs table against `markdown_table()`.

    >>> [o.name for o in EXPORT_OPTIONS][:3]
    ['classes', 'model', 'checkpoint']
    >>> option("opset").parse("17"), option("text_encoder").parse("false")
    (17, False)
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from mlflow_clip.errors import SpecError

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "bf16")
# The zero-shot head (serving.contract.HEADS, spelled here so the table stays torch- and import-light).
HEAD_CHOICES: tuple[str, ...] = ("softmax", "sigmoid")
DEFAULT_OPSET = 17
DEFAULT_REGISTERED_MODEL_NAME = "clip-zero-shot"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class ExportOption:
    """One export option. `doc` is Markdown (docs/export.md); `--help` shows it without the
    backticks. `default_doc` names a default that is not a value (`per precision`); `declared`
    is False for the one option MLproject leaves out so that leaving it out means "the
    precision's own" (MLflow still passes `-P max_prob_diff=...` through to the command)."""

    name: str
    default: Any
    doc: str
    kind: type = str  # str, int, float or bool
    required: bool = False
    default_doc: str = ""
    declared: bool = True
    choices: tuple[str, ...] = ()

    @property
    def metavar(self) -> str:
        if self.choices:
            return "[" + "|".join(self.choices) + "]"
        return {bool: "true|false", int: "INTEGER", float: "NUMBER"}.get(self.kind, "TEXT")

    @property
    def flags(self) -> tuple[str, ...]:
        """`--text-encoder`, and `--text_encoder` too: MLflow passes undeclared parameters as `--name`."""
        kebab = "--" + self.name.replace("_", "-")
        return (kebab, "--" + self.name) if "_" in self.name else (kebab,)

    @property
    def text_default(self) -> str | None:
        """The default as the command line (and MLproject) spell it; None when required."""
        if self.required:
            return None
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return "" if self.default is None else str(self.default)

    @property
    def shown_default(self) -> str:
        """The default as docs/export.md and `--help` show it."""
        if self.required:
            return "(required)"
        if self.default_doc:
            return self.default_doc
        return f"`{self.text_default}`" if self.text_default else "none"

    @property
    def help(self) -> str:
        return _plain(self.doc) + ("" if self.required else f" [default: {_plain(self.shown_default)}]")

    def parse(self, value: Any) -> Any:
        """`value` as this option's kind, from Python or from text; raises `SpecError` naming it."""
        if self.kind is bool:
            return _parse_bool(self.name, value)
        if self.kind is int:
            return _parse_int(value)
        if self.kind is float:
            return _parse_float(self.name, value)
        return value


EXPORT_OPTIONS: tuple[ExportOption, ...] = (
    ExportOption(
        "classes",
        None,
        "`a,b,c`, or `@path` to a UTF-8 file with one class per line. Empty, blank, duplicate (ignoring case) "
        "names and names containing `;` are refused.",
        required=True,
    ),
    ExportOption(
        "model",
        "RN50",
        "an OpenAI CLIP name (`RN50`, `ViT-B/32`, ...: downloaded once to `~/.cache/clip` or "
        "`$MLFLOW_CLIP_CACHE_DIR`; offline, a name not cached there is refused at once), `demo` (the embedded "
        "demo model), a local OpenAI checkpoint file, `open_clip:<architecture>` (with `checkpoint`; SigLIP and "
        "multilingual towers also with `tokenizer`), `open_clip:local-dir:<folder>`, or `hf:<folder>` (a Hugging "
        "Face `CLIPModel` or `SiglipModel` folder); docs/sources.md",
    ),
    ExportOption(
        "checkpoint",
        None,
        "with `open_clip:<architecture>`: the local weights file (nothing is downloaded); an absolute path "
        "under `mlflow run`, which runs in the project folder",
    ),
    ExportOption(
        "tokenizer",
        None,
        "with open_clip's SigLIP and multilingual models: the local tokenizer folder (and the text tower's "
        "`config.json`); an absolute path under `mlflow run`",
    ),
    ExportOption(
        "head",
        None,
        "`softmax` (one label per image) or `sigmoid` (each class judged on its own: SigLIP's, its default)",
        default_doc="the source's",
        choices=HEAD_CHOICES,
    ),
    ExportOption(
        "templates",
        "ensemble",
        "`none` (class text as-is), `photo` (`a photo of a {}.`), `ensemble` (CLIP's 80 ImageNet templates), "
        "or `@path` to a file of templates containing `{}`. Articles are never doubled: `a photo of a {}.` + "
        "`an apple` gives `a photo of an apple.`",
    ),
    ExportOption(
        "registered_model_name",
        DEFAULT_REGISTERED_MODEL_NAME,
        "the registered model that gets the new version (empty: log the model, register nothing)",
    ),
    ExportOption(
        "opset",
        DEFAULT_OPSET,
        "ONNX opset, 12 or newer. The original guide's opset 12 works: for opsets before 14 the attention "
        "layers are exported as plain matmul + softmax.",
        kind=int,
    ),
    ExportOption(
        "images",
        None,
        "folder of images used for parity (and to calibrate static int8)",
        default_doc="the package's samples",
    ),
    ExportOption(
        "max_prob_diff",
        None,
        "parity gate on probabilities: `1e-4` (fp32), `1e-2` (fp16), `0.1` (int8), `1e-2` (bf16). Optional: "
        "left out, the precision's gate applies.",
        kind=float,
        default_doc="per precision",
        declared=False,
    ),
    ExportOption("alias", None, "alias to set on the new version, e.g. `challenger`"),
    ExportOption(
        "text_encoder",
        True,
        "also ship CLIP's text encoder (labels chosen per request, text embeddings); `false` leaves it out "
        "(RN50: a 139 MB model instead of 394 MB, of which the text encoder is 255 MB)",
        kind=bool,
    ),
    ExportOption(
        "precision",
        "fp32",
        "`fp32`, `fp16` (for GPU providers: the model's providers default to CUDA, then CPU), `int8` "
        "(onnxruntime quantization, for CPUs) or `bf16` (OpenVINO, for CPUs with native bf16; needs "
        '`pip install "mlflow-clip[openvino]"`); or `auto` (`fp32`, `int8`, and `bf16` where OpenVINO is '
        "installed and has bf16 on the CPU: AVX-512), or a list such as `fp32,bf16`: one export gated at each, "
        "served at the fastest gated precision native on the CPU it loads on, int8 also where its gate ran on "
        "the same int8 kernels (docs/precision.md)",
    ),
    ExportOption(
        "truncate",
        False,
        "keep CLIP's cut of prompts longer than its 77-token context instead of refusing them",
        kind=bool,
    ),
)
OPTION_NAMES: tuple[str, ...] = tuple(o.name for o in EXPORT_OPTIONS)


def option(name: str) -> ExportOption:
    return EXPORT_OPTIONS[OPTION_NAMES.index(name)]


def check_option_names(given: dict[str, Any]) -> None:
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise SpecError(f"Received unknown export option(s) {', '.join(unknown)}; expected {', '.join(OPTION_NAMES)}.")


def with_export_options(*before: str, after: tuple[str, ...] = ()) -> Callable:
    """Show a function taking `**options` with each export option as a keyword argument (in
    `help()`, `inspect.signature` and IDEs); `before` are its own leading parameters."""

    def decorate(function: Callable) -> Callable:
        own = inspect.signature(function).parameters
        head = [own[name] for name in before]
        options = [
            inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default)
            for o in EXPORT_OPTIONS
            if not o.required and o.name not in own
        ]
        tail = [own[name].replace(kind=inspect.Parameter.KEYWORD_ONLY) for name in after]
        function.__signature__ = inspect.signature(function).replace(parameters=[*head, *options, *tail])
        return function

    return decorate


def markdown_table() -> str:
    """docs/export.md's table of `mlflow run .` parameters (and `mlflow-clip export` options)."""
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    rows += [f"| `{o.name}` | {o.shown_default} | {o.doc} |" for o in EXPORT_OPTIONS]
    return "\n".join(rows)


def _plain(markdown: str) -> str:
    return re.sub(r"`([^`]*)`", r"\1", markdown)


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise SpecError(f"Received {name}={str(value)[:40]!r}; expected true or false.")


def _parse_int(value: Any) -> Any:
    """An int from digits; anything else is returned as it came, for the option's own check to name."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _parse_float(name: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise SpecError(
            f"Received {name}={str(value)[:40]!r}; expected a number of at least 0, e.g. 1e-3, or nothing for "
            "the precision's own gate."
        )
    return number
