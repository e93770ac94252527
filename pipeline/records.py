"""What the pipeline's steps hand each other: one typed record per artifact, one name and one type per fact.

Between KFP tasks the records travel as JSON files in artifacts; each file names its format
(``"format": "bockd-<kind>/2"``; version 1 was the untyped dicts of earlier releases) and a reader refuses
any other, naming the file. The same facts keep the same names in every record:

- ``student``: the 1-based student number (1 = S1, the full-size network), always an ``int``;
- ``label``: how tables show it, ``"S3"``;
- ``student_name``: the exported student's own name, ``"resnet20-s3"`` (its ``config.json``);
- ``registered_model`` / ``version``: the MLflow registered model and the version of it, both strings;
- accuracies (``top1``, ``top5``, ``baseline_top1``, ``gain``) in percent of the test images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bockd.atomic import write_json
from bockd.errors import DataError
from bockd.pipeline.selection import Selection

__all__ = [
    "BaselineRecord",
    "Endpoint",
    "Endpoints",
    "EvaluationRecord",
    "Promotion",
    "Registration",
    "Registrations",
    "SelectionRecord",
    "Summary",
    "SummaryRow",
    "TrainingResult",
    "read_records",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Record(_Model):
    """A record written to a file of its own: ``format`` says which record and which version it is."""

    FORMAT: ClassVar[str]
    FILENAME: ClassVar[str]
    format: str

    def __init__(self, **data: Any) -> None:
        super().__init__(**{"format": self.FORMAT, **data})

    def model_post_init(self, context: Any) -> None:
        if self.format != self.FORMAT:
            raise ValueError(f"format {self.format!r} is not {self.FORMAT!r}")

    def write(self, path: str | Path) -> Path:
        """The record as JSON at ``path`` (a file, or a folder that gets ``FILENAME``), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / self.FILENAME
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, path: str | Path) -> Self:
        """The record in ``path`` (a file, or a folder holding ``FILENAME``); `DataError` naming the file."""
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILENAME
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError, ValidationError) as err:
            raise DataError(f"{path}: not a {cls.FORMAT} record: {err}") from err


R = TypeVar("R", bound=Record)


class TrainingResult(_Model):
    """What training the ensemble returns (``train_ensemble``; rank 0's ``result.json`` of a TrainJob)."""

    students: list[int]  # 1..N: the evaluate loop's items
    mlflow_run_id: str  # "" without tracking
    final: dict[str, float]  # the last epoch's metrics under the engine's keys (``test/s1/top1``, ...)


class BaselineRecord(Record):
    """One student trained alone (cross-entropy only, same schedule): ``baseline.json`` of its Model."""

    FORMAT: ClassVar[str] = "bockd-baseline/2"
    FILENAME: ClassVar[str] = "baseline.json"
    student: int
    student_name: str
    top1: float
    top5: float


class EvaluationRecord(Record):
    """One student of the ensemble on the test split: ``evaluation.json`` (beside ``confusion.png``)."""

    FORMAT: ClassVar[str] = "bockd-evaluation/2"
    FILENAME: ClassVar[str] = "evaluation.json"
    student: int
    label: str
    student_name: str
    params: int  # base + branch, adapters excluded
    size_pct: float  # params in % of S1's
    top1: float
    top5: float  # top-k with k = min(5, classes)
    num_test: int
    classes: list[str]
    confusion: list[list[int]]  # rows = true class, columns = predicted
    per_class_accuracy: list[float | None]  # percent; None for a class absent from the split
    flops: int  # of one forward at batch 1
    latency_ms: dict[str, dict[str, float]]  # batch size -> {"p50": ms, "p99": ms}
    test_set: str  # sha256 of the prepared dataset: accuracies on different test sets never compare
    config: dict[str, Any]  # the exported student's config.json

    @property
    def latency_p50_ms(self) -> float | None:
        """p50 latency of one image (batch 1), if measured."""
        return self.latency_ms.get("1", {}).get("p50")


class Registration(_Model):
    """One student as an MLflow registered model version."""

    student: int
    registered_model: str
    version: str
    created: bool  # False: the version existed already (a re-run registers nothing)


class Registrations(Record):
    FORMAT: ClassVar[str] = "bockd-registrations/2"
    FILENAME: ClassVar[str] = "registrations.json"
    registrations: list[Registration]

    def of(self, student: int) -> Registration | None:
        return next((r for r in self.registrations if r.student == student), None)


class Promotion(_Model):
    """Whether a chosen student's version became its model's ``@champion``, and why (not)."""

    student: int
    registered_model: str
    promoted: bool
    message: str


class SelectionRecord(Record):
    """The selection policy applied: every student's verdict with its reason, the chosen ones, promotions."""

    FORMAT: ClassVar[str] = "bockd-selection/2"
    FILENAME: ClassVar[str] = "selection.json"
    policy: dict[str, Any]  # the validated policy, unset rules left out
    selection: Selection  # the selection engine's verdicts (its candidates' ``index`` is 0-based)
    chosen: list[int]  # student numbers, ascending
    promotions: list[Promotion]
    markdown: str  # the verdicts as a Markdown table


class SummaryRow(_Model):
    """One student in the report, the MLflow run and ``bockd pipeline run --local``'s table."""

    student: int
    label: str
    params: int
    size_pct: float
    top1: float
    top5: float
    baseline_top1: float | None
    gain: float | None  # top1 - baseline_top1, in points
    gain_noise: float | None  # two binomial standard errors of that difference, in points
    gain_reading: str | None  # bockd.significance.reading: "gain", "loss" or "within noise"
    flops: int
    latency_ms: float | None  # p50 at batch 1
    registered_model: str | None
    version: str | None
    selected: bool


class Summary(Record):
    FORMAT: ClassVar[str] = "bockd-summary/2"
    FILENAME: ClassVar[str] = "summary.json"
    rows: list[SummaryRow]


class Endpoint(_Model):
    """A deployed student: its registered model version and where it answers."""

    student: int
    registered_model: str
    version: str
    url: str


class Endpoints(Record):
    FORMAT: ClassVar[str] = "bockd-endpoints/2"
    FILENAME: ClassVar[str] = "endpoints.json"
    endpoints: list[Endpoint]


def read_records(record: type[R], folders: list[str | Path]) -> list[R]:
    """One ``record`` from each folder (the artifacts a KFP ``dsl.Collected`` hands a step)."""
    return [record.read(f) for f in folders]
