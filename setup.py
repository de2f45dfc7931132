"""mlflow-clip: CLIP zero-shot image classifiers as parity-checked ONNX models in MLflow.

`pip install .` is the serving install (onnxruntime, no torch);
`pip install ".[export]"` adds what exporting needs; `".[openvino]"` the optional OpenVINO
runtime (needed by bf16 models); `".[test]"` the test tools.
"""

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
    "click>=8",
    # The text tokenizer (mlflow_clip/tokenizer.py) cleans and splits text exactly as CLIP does.
    "ftfy",
    "regex",
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
# Other sources of CLIP weights for the export (`-P model=open_clip:<architecture>` and
# `-P model=hf:<folder>`, docs/sources.md): open_clip builds the architecture from its own configs,
# transformers loads a CLIPModel folder, and each is the parity reference for its models.
# Export-side only: a served model needs none of it (its tokenizer and preprocessing are
# mlflow-clip's own), so it stays out of the serving install and out of `export`. transformers 5:
# the served `hf` tokenizer reproduces its tokenizers-backed CLIPTokenizer, and parity uses its
# CLIPImageProcessorPil.
SOURCES_REQUIRES = ["open_clip_torch>=3", "transformers>=5,<6"]
TEST_REQUIRES = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "requests>=2.31",
    "pyspark>=3.5",
    "psycopg[binary]>=3.1",
    # `mlflow models serve --env-manager uv`: environments built from a model alone.
    "uv>=0.4",
    "ruff>=0.6",
    # The OpenVINO runtime's tests (tests/serving/test_openvino.py, tests/export/test_bf16.py).
    *OPENVINO_REQUIRES,
    # The open_clip and Hugging Face sources' tests (tests/export/test_sources.py, test_hf_source.py).
    *SOURCES_REQUIRES,
]

# CLIP's resize + crop + normalize in one native pass, bit-exact with Pillow (checked against the
# installed Pillow before use, mlflow_clip/serving/preprocess.py). Optional: without a C compiler
# the install still succeeds and Pillow does the same work more slowly. It lives inside the
# serving package, so every model carries it (with its C source) in its own copy of that package.
RESAMPLE_EXTENSION = Extension(
    "mlflow_clip.serving._mlflow_clip_resample",
    sources=["mlflow_clip/serving/resample.c"],
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
        # The benchmark's docs page: its prose, around the tables of a run.
        "mlflow_clip.bench": ["docs_template.md"],
    },
    include_package_data=True,
    install_requires=SERVING_REQUIRES,
    extras_require={
        "export": EXPORT_REQUIRES,
        "openvino": OPENVINO_REQUIRES,
        "sources": SOURCES_REQUIRES,
        "test": TEST_REQUIRES,
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
