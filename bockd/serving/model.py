"""KServe models for exported students: one (``StudentModel``) or several averaged (``EnsembleModel``).

Both speak V1 (``/v1/models/<name>:predict``) and V2 / Open Inference Protocol (``/v2/models/<name>/infer``);
request formats are in ``bockd.serving.preprocess``. preprocess() decodes and normalizes, predict() runs the
network(s), postprocess() shapes the answer for the protocol the request came in on.

None of that runs on the event loop: a request is worked on in one of the model's ``executor`` threads
(``max_concurrent_requests`` of them), so health checks and metadata keep answering while it runs.

Backends: ``onnx`` (the default) runs the exported ``model.onnx`` on ONNX Runtime and needs nothing of
training, so the serving image carries no PyTorch; ``torch`` rebuilds the student from its safetensors and
imports PyTorch and ``bockd.export`` only when a model is loaded with it.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import uuid
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from kserve.errors import InvalidInput, ModelNotReady
from kserve.model import InferenceVerb
from kserve.protocol.grpc.grpc_predict_v2_pb2 import ModelInferRequest
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, RequestedOutput

from bockd.errors import CheckpointError, ConfigError
from bockd.export_format import ONNX_FILE, read_student_config
from bockd.onnx_student import onnx_session, softmax
from bockd.serving.preprocess import (
    MAX_BATCH_LIMIT,
    InputSpec,
    RequestLimits,
    batch_from_v1,
    batch_from_v2,
    short,
)

BACKENDS = ("torch", "onnx")
DEFAULT_BACKEND = "onnx"  # what every install of the server can run: the serving image has no torch
OUTPUTS = ("probabilities", "top_k_indices", "top_k_classes")
# bockd.cascade.CASCADE_FILE, named here so that serving a student imports nothing of the cascade.
CASCADE_FILE = "cascade.json"
# Every student of an ensemble must agree on these, or averaging their logits means nothing.
_SHARED_FIELDS = ("classes", "num_classes", "in_channels", "input_shape", "mean", "std")


class _TorchRunner:
    def __init__(self, folder: Path) -> None:
        try:  # imported here: the onnx backend must not pull in PyTorch and the training modules
            import torch

            from bockd.export import load_student
        except ImportError as err:
            raise ConfigError(
                f"backend torch needs PyTorch, which cannot be imported here ({err}); "
                f"serve the exported {ONNX_FILE} with --backend onnx"
            ) from err
        self.torch = torch
        self.module = load_student(folder)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.module(self.torch.from_numpy(x)).numpy()


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def cpu_limit(cpu_max: Path | None = None) -> int | None:
    """The container's CPU limit in whole CPUs (rounded up), or None when there is none or no cgroup v2.

    A pod with ``limits.cpu: 1`` on a 64-core node sees 64 cores; one ONNX Runtime thread per core would
    be throttled to one core's time and queue behind itself (Kubernetes enforces limits as CFS quota).
    """
    try:
        quota, period = (cpu_max or CGROUP_CPU_MAX).read_text().split()[:2]
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # "max" (no limit), no such file, or not a cgroup v2 host
        return None


def intra_op_threads() -> int:
    """ONNX Runtime's intra-op threads: what torch uses when it is loaded, else OMP_NUM_THREADS, else the
    container's CPU limit, else 0 (ONNX Runtime picks one per physical core, as torch's default does)."""
    torch = sys.modules.get("torch")  # never imported for this: the onnx backend runs without it
    if torch is not None and hasattr(torch, "get_num_threads"):
        return int(torch.get_num_threads())
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return cpu_limit() or 0


class _OnnxRunner:
    def __init__(self, folder: Path) -> None:
        self.session = onnx_session(folder, intra_op_threads())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"input": x})[0]


@dataclass(frozen=True)
class _Batch:
    """A decoded request: normalized input plus what the response needs to echo back."""

    x: np.ndarray
    request: InferRequest | None  # None for V1


@dataclass(frozen=True)
class _Result:
    probabilities: np.ndarray
    request: InferRequest | None


def _limits(limits: RequestLimits | None, max_batch: int | None) -> RequestLimits:
    """``limits`` (default: RequestLimits()) with ``max_batch`` instead of its own when one is given."""
    if max_batch is not None and not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ValueError(f"max_batch must be 1..{MAX_BATCH_LIMIT}, got {max_batch}")
    limits = limits or RequestLimits()
    return limits if max_batch is None else replace(limits, max_batch=max_batch)


def _finish(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends to its end, in the calling thread (no event loop needed)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the inference coroutine awaited something: it cannot run off the event loop")


class ClassifierModel(kserve.Model):
    """Shared machinery: load students, decode requests, average logits, answer V1 or V2."""

    def __init__(
        self,
        name: str,
        model_dirs: Sequence[str | Path],
        backend: str,
        max_batch: int | None,
        top_k: int,
        limits: RequestLimits | None = None,
    ) -> None:
        super().__init__(name)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(model_dirs, (str, Path)) or not model_dirs:
            raise ValueError("model_dirs must be a non-empty list of exported student folders")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.model_dirs = [Path(d) for d in model_dirs]
        self.backend = backend
        self.limits = _limits(limits, max_batch)
        self.top_k = top_k
        self.config: dict[str, Any] = {}
        self.spec: InputSpec | None = None
        self.classes: list[str] = []
        self._runners: list[Any] = []
        self._executor: ThreadPoolExecutor | None = None

    @property
    def max_batch(self) -> int:
        return self.limits.max_batch

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The threads requests are worked on: ``limits.max_concurrent_requests`` of them."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.limits.max_concurrent_requests, f"bockd-{self.name}")
        return self._executor

    def stop(self) -> None:
        super().stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- loading ---------------------------------------------------------------------------------------------

    def load(self) -> bool:
        configs = [read_student_config(d) for d in self.model_dirs]
        first = configs[0]
        for folder, config in zip(self.model_dirs[1:], configs[1:], strict=True):
            for field in _SHARED_FIELDS:
                if config.get(field) != first.get(field):
                    raise CheckpointError(
                        f"ensemble: {folder} has {field}={config.get(field)!r} but {self.model_dirs[0]} has "
                        f"{first.get(field)!r}; only students of the same dataset and input can be averaged"
                    )
        spec = InputSpec.from_config(first, str(self.model_dirs[0] / "config.json"))
        classes = [str(c) for c in first.get("classes", [])]
        if len(classes) != first.get("num_classes"):
            raise CheckpointError(
                f"{self.model_dirs[0]}: {len(classes)} class names for {first.get('num_classes')} classes"
            )
        runner = _TorchRunner if self.backend == "torch" else _OnnxRunner
        self._runners = [runner(d) for d in self.model_dirs]
        self.config, self.spec, self.classes = first, spec, classes
        self.ready = True
        return self.ready

    @property
    def k(self) -> int:
        return min(self.top_k, len(self.classes))

    # -- metadata (GET /v2/models/<name>) ----------------------------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        """Every form a request's one input tensor may take, one metadata entry each (send exactly one).

        The Open Inference Protocol's metadata tensor has a single datatype and no way to say "one of";
        Triton lists optional inputs the same way. Shapes are the network's own size: other sizes and
        channel counts are accepted and resized (PIL bilinear). Input names are not checked.
        """
        c, h, w = self.spec.shape if self.spec else (-1, -1, -1)
        return [
            {"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]},  # pixels in [0, 1], NCHW
            {"name": "input_uint8", "datatype": "UINT8", "shape": [-1, h, w, c]},  # NHWC
            {"name": "input_bytes", "datatype": "BYTES", "shape": [-1]},  # PNG/JPEG files
        ]

    def get_output_types(self) -> list[dict[str, Any]]:
        n, k = len(self.classes) or -1, self.k or -1
        return [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
            {"name": "top_k_indices", "datatype": "INT64", "shape": [-1, k]},
            {"name": "top_k_classes", "datatype": "BYTES", "shape": [-1, k]},
        ]

    # -- inference -------------------------------------------------------------------------------------------

    async def __call__(
        self, body: Any, headers: dict[str, str] | None = None, verb: InferenceVerb = InferenceVerb.PREDICT
    ) -> tuple[Any, dict[str, str]]:
        """kserve's preprocess -> predict -> postprocess, in one of ``executor``'s threads (every caller:
        kserve's DataPlane, gRPC, in-process tests); the event loop only waits for the answer."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.infer_sync, body, headers, verb)

    def infer_sync(
        self, body: Any, headers: dict[str, str] | None = None, verb: InferenceVerb = InferenceVerb.PREDICT
    ) -> tuple[Any, dict[str, str]]:
        """One request, decoded to answered, in the calling thread: (response, response headers).

        This is kserve's own ``Model.__call__`` (its latency histograms and log line included). It awaits a
        handler only when the handler is a coroutine function (kserve/model.py ``Model.__call__``); ours
        are plain functions, so it never suspends and is run to its end here without an event loop.
        """
        return _finish(kserve.Model.__call__(self, body, headers, verb))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Mean of the students' logits for normalized float32 NCHW ``x`` (one student: its logits)."""
        outs = [runner(x) for runner in self._runners]
        return outs[0] if len(outs) == 1 else np.mean(np.stack(outs), axis=0, dtype=np.float32)

    def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> _Batch:
        if self.spec is None:
            raise ModelNotReady(self.name)
        if isinstance(payload, ModelInferRequest):
            payload = InferRequest.from_grpc(payload)
        if isinstance(payload, InferRequest):
            self._check_requested_outputs(payload.request_outputs)
            return _Batch(batch_from_v2(payload, self.spec, self.limits), payload)
        return _Batch(batch_from_v1(payload, self.spec, self.limits), None)

    def validate(self, payload: Any) -> Any:
        # kserve's own check knows dicts and InferRequests; ours was already validated while decoding.
        return payload if isinstance(payload, _Batch) else super().validate(payload)

    def predict(
        self, payload: _Batch, headers: dict[str, str] | None = None, response_headers: dict | None = None
    ) -> _Result:
        return _Result(softmax(self.logits(payload.x)), payload.request)

    def postprocess(
        self, result: _Result, headers: dict[str, str] | None = None, response_headers: dict | None = None
    ) -> dict[str, Any] | InferResponse:
        probs = result.probabilities
        # Stable sort so equal probabilities keep class order: deterministic answers.
        top = np.argsort(-probs, axis=1, kind="stable")[:, : self.k].astype(np.int64)
        if result.request is None:
            return {"predictions": [self._v1_row(p, t) for p, t in zip(probs, top, strict=True)]}
        names = np.asarray([[self.classes[i].encode() for i in row] for row in top], dtype=np.object_)
        outputs = [
            InferOutput("probabilities", list(probs.shape), "FP32", data=probs),
            InferOutput("top_k_indices", list(top.shape), "INT64", data=top),
            InferOutput("top_k_classes", list(names.shape), "BYTES", data=names),
        ]
        req = result.request
        return InferResponse(
            response_id=req.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=req.use_binary_outputs,
            requested_outputs=req.request_outputs,
        )

    def _v1_row(self, probs: np.ndarray, top: np.ndarray) -> dict[str, Any]:
        return {
            "probabilities": probs.tolist(),
            "top_k": [
                {"index": int(i), "class": self.classes[i], "probability": float(probs[i])} for i in top
            ],
        }

    @staticmethod
    def _check_requested_outputs(requested: list[RequestedOutput] | None) -> None:
        for out in requested or []:
            if out.name not in OUTPUTS:
                raise InvalidInput(f"unknown output {short(out.name)}; this model returns {list(OUTPUTS)}")


class StudentModel(ClassifierModel):
    """One exported student (a folder written by ``bockd.export.export_student``).

    ``limits`` bounds every request (``RequestLimits``; default: its defaults); ``max_batch``, when given,
    replaces its ``max_batch``.
    """

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        backend: str = DEFAULT_BACKEND,
        max_batch: int | None = None,
        top_k: int = 5,
        limits: RequestLimits | None = None,
    ) -> None:
        super().__init__(name, [model_dir], backend, max_batch, top_k, limits)
        self.model_dir = Path(model_dir)


class EnsembleModel(ClassifierModel):
    """Several exported students of one run: their logits are averaged, then softmaxed."""

    def __init__(
        self,
        name: str,
        model_dirs: Sequence[str | Path],
        backend: str = DEFAULT_BACKEND,
        max_batch: int | None = None,
        top_k: int = 5,
        limits: RequestLimits | None = None,
    ) -> None:
        super().__init__(name, model_dirs, backend, max_batch, top_k, limits)


def build_model(
    name: str,
    model_dirs: Sequence[str | Path],
    backend: str = DEFAULT_BACKEND,
    max_batch: int | None = None,
    top_k: int = 5,
    limits: RequestLimits | None = None,
) -> ClassifierModel:
    """One folder -> StudentModel (or CascadeModel when it holds ``cascade.json``), several ->
    EnsembleModel (not loaded yet)."""
    cascades = [str(d) for d in model_dirs if (Path(d) / CASCADE_FILE).is_file()]
    if cascades:
        if len(model_dirs) != 1:
            raise ValueError(f"a cascade folder is served alone, not with other folders: {cascades[0]}")
        from bockd.serving.cascade import CascadeModel  # builds on this module; loaded only for a cascade

        return CascadeModel(name, model_dirs[0], backend, max_batch, top_k, limits)
    if len(model_dirs) == 1:
        return StudentModel(name, model_dirs[0], backend, max_batch, top_k, limits)
    return EnsembleModel(name, model_dirs, backend, max_batch, top_k, limits)
