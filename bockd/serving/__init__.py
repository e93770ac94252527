"""KServe predictor for exported students: V1 and V2 REST, one student, an averaged ensemble or a cascade.

``python -m bockd.serving --model_dir DIR`` runs a server (``server``: arguments and process; ``rest``: its
HTTP layer; ``model``: the kserve Models; ``cascade``: the confidence cascade's; ``preprocess``: request
formats and budgets);
``predict_v1``/``predict_files`` are a minimal client. Running one in the background on 127.0.0.1 is the
platform's job (``bockd.platform.services.model_servers``).

The server runs on kserve + ONNX Runtime alone (``--backend onnx``, the default) and imports nothing of
training; ``--backend torch`` imports PyTorch when a model is loaded. Names are imported on first use: the
client does not need torch or kserve loaded (and importing kserve parses ``sys.argv`` as a side effect).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKENDS": "bockd.serving.model",
    "CascadeModel": "bockd.serving.cascade",
    "EnsembleModel": "bockd.serving.model",
    "StudentModel": "bockd.serving.model",
    "build_model": "bockd.serving.model",
    "InputSpec": "bockd.serving.preprocess",
    "MAX_IMAGE_BYTES": "bockd.serving.preprocess",
    "MAX_PIXELS": "bockd.serving.preprocess",
    "RequestLimits": "bockd.serving.preprocess",
    "RequestTooLarge": "bockd.serving.preprocess",
    "ServingError": "bockd.serving.errors",
    "predict_files": "bockd.serving.client",
    "predict_v1": "bockd.serving.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bockd.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
