"""KServe model for a confidence cascade folder (``bockd.cascade.build_cascade``): one endpoint, its students.

The smallest student runs on the whole batch; the rows whose largest probability is under its threshold
(``cascade.json``) go on to the next larger student, and so on; the largest answers whatever reaches it
(``bockd.cascade.run_cascade``, the rule `bockd.cascade.route` states). Each row is answered with the
probabilities of the student that answered it, and the response says which student that was:

* V1: each ``predictions`` row keeps ``probabilities`` and ``top_k`` and gains ``"student": "S5"``;
* V2: a ``student`` output (BYTES ``[N]``, the labels) beside ``probabilities``, ``top_k_indices`` and
  ``top_k_classes``; the model metadata lists it.

Everything else is `ClassifierModel`'s: request formats, budgets (for the whole request, whichever students
it reaches), the executor threads, errors (4xx with short messages), readiness. The students are served
from their ``model.onnx`` on ONNX Runtime (the cascade folder holds no safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferResponse, RequestedOutput

from bockd.cascade import Cascade, read_cascade, run_cascade
from bockd.onnx_student import softmax
from bockd.serving.model import (
    DEFAULT_BACKEND,
    OUTPUTS,
    ClassifierModel,
    _Batch,
    _Result,
)
from bockd.serving.preprocess import RequestLimits, short

CASCADE_OUTPUTS = (*OUTPUTS, "student")


@dataclass(frozen=True)
class _CascadeResult(_Result):
    answered_by: np.ndarray  # int [N]: the stage (0 = smallest) that answered each row


class CascadeModel(ClassifierModel):
    """A cascade folder served as one model: the smallest student first, escalating what it is unsure of.

    ``model_dir``: a folder written by ``bockd.cascade.build_cascade``; ``limits`` / ``max_batch`` /
    ``top_k`` as for `StudentModel`. Only the ``onnx`` backend (ValueError otherwise). ``load()`` raises
    CheckpointError when the folder is not a readable cascade.
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
        if backend != "onnx":
            raise ValueError(
                f"backend {backend!r}: a cascade serves its students' model.onnx (its folder holds no "
                "safetensors); use --backend onnx"
            )
        super().__init__(name, [model_dir], backend, max_batch, top_k, limits)
        self.model_dir = Path(model_dir)
        self.cascade: Cascade | None = None
        self._labels = np.zeros(0, dtype=np.object_)

    def load(self) -> bool:
        cascade = read_cascade(self.model_dir)
        self.cascade = cascade
        self._labels = np.asarray([label.encode() for label in cascade.labels], dtype=np.object_)
        self.model_dirs = [stage.folder for stage in cascade.stages]
        return super().load()  # the students' runners, input spec and classes; ready

    @property
    def labels(self) -> tuple[str, ...]:
        """The students' labels, smallest first (what ``student`` says)."""
        return self.cascade.labels if self.cascade else ()

    def get_output_types(self) -> list[dict[str, Any]]:
        return [*super().get_output_types(), {"name": "student", "datatype": "BYTES", "shape": [-1]}]

    def predict(
        self, payload: _Batch, headers: dict[str, str] | None = None, response_headers: dict | None = None
    ) -> _CascadeResult:
        assert self.cascade is not None  # preprocess() refused the request otherwise (ModelNotReady)
        stages = [lambda x, run=runner: softmax(run(x)) for runner in self._runners]
        probs, answered_by = run_cascade(stages, payload.x, self.cascade.thresholds)
        return _CascadeResult(probs, payload.request, answered_by)

    def postprocess(
        self, result: _Result, headers: dict[str, str] | None = None, response_headers: dict | None = None
    ) -> dict[str, Any] | InferResponse:
        response = super().postprocess(result, headers, response_headers)
        assert isinstance(result, _CascadeResult)
        students = self._labels[result.answered_by]
        if isinstance(response, dict):
            for row, student in zip(response["predictions"], students, strict=True):
                row["student"] = student.decode()
            return response
        # Outputs a request left out are dropped when the response is encoded (InferResponse.to_rest).
        response.outputs.append(InferOutput("student", [len(students)], "BYTES", data=students))
        return response

    @staticmethod
    def _check_requested_outputs(requested: list[RequestedOutput] | None) -> None:
        for out in requested or []:
            if out.name not in CASCADE_OUTPUTS:
                raise InvalidInput(
                    f"unknown output {short(out.name)}; this model returns {list(CASCADE_OUTPUTS)}"
                )
