"""Serving: everything a model carries and runs (onnxruntime, numpy, Pillow; never torch).

`save_model` copies this package whole into each model's `code/` folder under a name of its own
(`mlflow_clip_serving_<digest of its files>`), so a served model runs exactly the code it was
saved with, and that copy never takes the place of the installed `mlflow_clip`. Every import
inside is relative for that reason, and nothing here imports `mlflow_clip` itself. Nothing is
imported lazily either: two models with the same serving code share one copy in `sys.modules`,
and the first one's directory may be gone (a temporary download) by the time the second loads.

    contract.py    file names, MLmodel keys, graph names, the classifier config, the hash
    manifest.py    the SHA-256 of every file that decides a prediction, and its check
    loader.py      the pyfunc loader MLflow calls, and the pyfunc wrapper
    v2.py          the output table and errors as MLServer's V2 codecs take them
    classifier.py  rows in, predictions out
    rows.py        a request's rows and parameters, checked
    images.py      decoding untrusted image bytes
    decode.py      header checks, pixel budgets and the decode itself
    deadline.py    the request's deadline, checked between pieces of work
    preprocess.py  CLIP's resize, crop and normalization (native or Pillow, same pixels)
    resample.py    the binding to the native extension
    runtime.py     the runtime settings, the runtime choice and the onnxruntime session
    openvino_runtime.py   the optional OpenVINO session (imported only when chosen; bf16)
    limits.py      per-request input limits
    prompts.py, tokenizer.py, text.py   labels, CLIP's tokenizer and text encoder
    errors.py      the error family's root, and how an error names a value
"""
