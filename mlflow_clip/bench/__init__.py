"""The benchmark: CLIP's PyTorch pipeline, raw onnxruntime, the pyfunc and the scoring server."""

from mlflow_clip.bench.run import *  # noqa: F401,F403
