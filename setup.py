"""mlflow-clip: CLIP zero-shot image classifiers as parity-checked ONNX models in MLflow.

`pip install .` is the serving install (onnxruntime, no torch);
`pip install ".[export]"` adds what exporting needs; `".[openvino]"` the optional OpenVINO
runtime (needed by bf16 models); `".[sentencepiece]"` the tokenizer of models exported from
Hugging Face SigLIP folders that hold only a SentencePiece model; `".[sources]"` open_clip,
transformers and timm; `".[test]"` the test tools (the serving tier); `".[dev]"` all of it, as
CI installs it.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, find_packages, setup

ROOT = Path(__file__).parent
version: dict = {}
exec((ROOT / "mlflow_clip" / "version.py").read_text(), version)

# Serving: what a model's requirements.txt lists (mlflow_clip/flavor.py, SERVING_REQUIREMENTS),
# plus what saving, registering and promoting need. Models declare mlflow-skinny; this install
# keeps full mlflow, a superset of it, because the registry and MLflow's default tracking store
# (sqlite:///mlflow.db) need the SQLAlchemy stack that only full mlflow brings: with
# mlflow-skinny alone, log_model(registered_model_name=...) fails ("Model registry
# functionality is unavailable").
# Pillow >= 12.1.1 and onnx >= 1.21.0 are the first releases free of the known
# image-decoding and external-data (path traversal / symlink) CVEs.
SERVING_REQUIRES = [
    "mlflow>=3.1,<4",
    "onnxruntime>=1.20",
    "onnx>=1.21.0",
    "numpy>=1.24",
    # The serving code builds its outputs as DataFrames; mlflow-skinny does not bring pandas.
    "pandas",
    "pillow>=12.1.1",
    # Baseline JPEGs decoded to Pillow's exact pixels in about half the time, checked against
    # Pillow at load (mlflow_clip/serving/fast_jpeg.py, docs/decisions/jpeg-decoder.md).
    "simplejpeg>=1.8",
    "click>=8",
    # The text tokenizer (mlflow_clip/serving/tokenizer.py) cleans and splits text exactly as CLIP does.
    "ftfy",
    "regex",
    # The tokenizers of SigLIP, SigLIP 2 and the multilingual towers (serving/text_tokenizers.py):
    # Hugging Face's Rust library, the one their sources run on (docs/decisions/tokenizer-library.md).
    "tokenizers>=0.20",
]
EXPORT_REQUIRES = [
    "torch>=2.3",
    "torchvision>=0.18",
    "openai-clip==1.0.1",
    # openai-clip still imports pkg_resources, which setuptools 81 removed.
    "setuptools<81",
    "onnxsim>=0.4.36",
    "sclblonnx>=0.3.0",
    # fp16 conversion (precision=fp16); int8 uses onnxruntime's own quantization.
    "onnxconverter-common>=1.14",
    "matplotlib>=3.7",
    "tqdm",
]
# The optional OpenVINO runtime (`runtime: openvino`, and bf16 models, which need it). The
# `openvino` package, not onnxruntime-openvino, which overwrites onnxruntime's own files with an
# older build (docs/decisions/openvino.md). It installs next to the serving stack unchanged.
OPENVINO_REQUIRES = ["openvino>=2024.0"]
# Hugging Face's own SiglipTokenizer (SigLIP folders with only spiece.model) runs in Python on a
# SentencePiece model: the models exported from such folders are served with sentencepiece.
SENTENCEPIECE_REQUIRES = ["sentencepiece>=0.2"]
# Other sources of CLIP weights for the export (`-P model=open_clip:<architecture>` and
# `-P model=hf:<folder>`, docs/sources.md): open_clip builds the architecture from its own configs,
# transformers loads a CLIPModel or SiglipModel folder, and each is the parity reference for its
# models. Export-side only: a served model needs none of it (its tokenizer files and preprocessing
# are in the model), so it stays out of the serving install and out of `export`. transformers 5:
# the served `hf` tokenizer reproduces its tokenizers-backed CLIPTokenizer, and parity uses its
# CLIPImageProcessorPil. timm builds SigLIP's image towers; sentencepiece reads SentencePiece-only
# tokenizer folders.
SOURCES_REQUIRES = ["open_clip_torch>=3", "transformers>=5,<6", "timm>=1", *SENTENCEPIECE_REQUIRES]
# The test tools: with the serving install alone they run the serving tier (`pytest -m serving`).
# pytest-xdist runs the quick tiers on every core (`-n auto`); CI's full run stays in one process.
TEST_REQUIRES = ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "requests>=2.31", "ruff>=0.6"]
# Everything the whole suite exercises (CI's install, `pip install -e ".[dev]"`): the export, the
# optional runtime and sources, Spark, PostgreSQL's driver, and uv for environments built from a
# model alone (`mlflow models serve --env-manager uv`).
DEV_REQUIRES = [
    *EXPORT_REQUIRES,
    *OPENVINO_REQUIRES,
    *SOURCES_REQUIRES,
    *TEST_REQUIRES,
    "pyspark>=3.5",
    "psycopg[binary]>=3.1",
    "uv>=0.4",
]

# CLIP's resize + crop + normalize in one native pass, bit-exact with Pillow (checked against the
# installed Pillow before use, mlflow_clip/serving/preprocess.py). Optional: without a C compiler
# the install still succeeds and Pillow does the same work more slowly. It lives inside the
# serving package, so every model carries it (with its C source) in its own copy of that package.
RESAMPLE_SOURCE = "mlflow_clip/serving/resample.c"
RESAMPLE_EXTENSION = Extension(
    "mlflow_clip.serving._mlflow_clip_resample",
    sources=[RESAMPLE_SOURCE],
    # The binary records the SHA-256 of its source: a model built elsewhere, carrying the same
    # source, is then served by this binary instead of being compiled at load time.
    define_macros=[
        ("MLFLOW_CLIP_SOURCE_SHA256", '"%s"' % hashlib.sha256((ROOT / RESAMPLE_SOURCE).read_bytes()).hexdigest())
    ],
    # No fused multiply-add: the filter weights must round exactly as Pillow's do.
    extra_compile_args=["-O3", "-ffp-contract=off"],
    optional=True,
)

setup(
    name="mlflow-clip",
    version=version["__version__"],
    description="Ship CLIP zero-shot image classifiers as parity-checked ONNX models through MLflow.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mlflow_clip", "mlflow_clip.*"]),
    ext_modules=[RESAMPLE_EXTENSION],
    package_data={
        "mlflow_clip": [
            "assets/*.pt",
            "assets/sample_images/*",
            "assets/bpe_simple_vocab_16e6.txt.gz",
            "assets/CLIP_LICENSE",
        ],
        # The native resize's source travels with the serving package into every model.
        "mlflow_clip.serving": ["resample.c"],
    },
    include_package_data=True,
    install_requires=SERVING_REQUIRES,
    extras_require={
        "export": EXPORT_REQUIRES,
        "openvino": OPENVINO_REQUIRES,
        "sentencepiece": SENTENCEPIECE_REQUIRES,
        "sources": SOURCES_REQUIRES,
        "test": TEST_REQUIRES,
        "dev": DEV_REQUIRES,
    },
    entry_points={
        "console_scripts": ["mlflow-clip=mlflow_clip.cli:cli"],
        "mlflow.model_evaluator": [
            "clip-zero-shot=mlflow_clip.evaluation.plugin:ClipZeroShotEvaluator",
            # MLflow's own classifier evaluator, able to read an mlflow-clip model's output columns
            "classifier=mlflow_clip.evaluation.builtin:ClassifierEvaluator",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
