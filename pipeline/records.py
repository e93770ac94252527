"""What the pipeline's steps hand each other: one typed record per artifact, one name and one type per fact.

Between KFP tasks the records travel as JSON files in artifacts; each file names its format
(``"format": "bockd-<kind>/2"``; version 1 was the untyped dicts of earlier releases) and a reader refuses
any other, naming the file. The same facts keep the same names in every record:

- ``student``: the 1-based student number (1 = S1, the full-size network), always an ``int``;
- ``label``: how tables show it, ``"S3"``;
- ``student_name``: the exported student's own name, ``"resnet20-s3"`` (its ``config.json``);
- ``registered_model`` / ``version``: the MLflow registered model and the version of it, both strings;
- accuracies (``top1``, ``top5``, ``baseline_top1``, ``gain``) in percent of the test images;
- ``precision``: ``"fp32"`` (the exported student) or ``"int8"`` (its statically quantized version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bockd.atomic import write_json
from bockd.errors import DataError
from bockd.pipeline.selection import Selection
from bockd.platform.serving_benchmark import BatchTiming, MachineInfo

__all__ = [
    "BaselineRecord",
    "CascadeEndpoint",
    "CascadeFitSummary",
    "CascadeRecord",
    "CascadeRegistration",
    "CascadeStageResult",
    "Endpoint",
    "Endpoints",
    "EvaluationRecord",
    "Int8Verdict",
    "MeasurementsRecord",
    "Pick",
    "Precision",
    "Promotion",
    "QuantizationRecord",
    "Registration",
    "Registrations",
    "SelectionRecord",
    "StudentMeasurement",
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
Precision = Literal["fp32", "int8"]


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


class QuantizationRecord(Record):
    """The int8 version of one student: ``quantization-record.json`` of the quantize step's Model artifact,
    the int8 student (``config.json`` + ``model.onnx`` + ``quantization.json``) in its ``int8/`` folder.

    With quantization off for the run, ``enabled`` is False and nothing was measured (every optional
    field None). ``drop`` = fp32 top-1 - int8 top-1 in points (negative: int8 scored higher);
    ``passed``: ``drop <= max_drop``, the condition for registering it.
    """

    FORMAT: ClassVar[str] = "bockd-quantization/1"
    FILENAME: ClassVar[str] = "quantization-record.json"
    INT8_DIR: ClassVar[str] = "int8"
    student: int
    label: str
    student_name: str  # the fp32 student's
    enabled: bool
    passed: bool
    max_drop: float
    int8_name: str | None = None  # the int8 student's own name ("resnet20-s3-int8")
    fp32_top1: float | None = None
    int8_top1: float | None = None
    drop: float | None = None
    agreement: float | None = None  # percent of test images both precisions classify alike
    fp32_bytes: int | None = None  # model.onnx on disk
    int8_bytes: int | None = None
    num_test: int | None = None
    calibration_images: int | None = None
    test_set: str = ""  # sha256 of the prepared dataset

    @property
    def drop_verdict(self) -> str:
        """``"drop 0.28 <= 1.00"`` / ``"drop 1.30 > 1.00"``, or why there is none."""
        if not self.enabled or self.drop is None:
            return "quantization off"
        return f"drop {self.drop:.2f} {'<=' if self.passed else '>'} {self.max_drop:.2f}"


class StudentMeasurement(_Model):
    """One student at one precision through the model server (`bockd.platform.serving_benchmark`)."""

    student: int
    label: str
    precision: Precision
    student_name: str
    size_bytes: int  # model.onnx on disk
    threads: int  # ONNX Runtime intra-op threads
    timings: list[BatchTiming]  # per batch size: served p50/p99 ms, images/s, raw forward ms, samples

    def at(self, batch: int) -> BatchTiming | None:
        return next((t for t in self.timings if t.batch == batch), None)

    @property
    def p50_ms(self) -> float | None:
        """Served p50 latency of one image (batch 1): the latency selection uses."""
        t = self.at(1)
        return t.p50_ms if t else None


Int8Outcome = Literal["kept", "not faster", "drop", "not measured", "off"]


class Int8Verdict(_Model):
    """Whether a student's int8 version may ship: within the drop limit AND measurably faster than its
    fp32 version on the machine that measured both ("faster or it does not ship")."""

    student: int
    label: str
    outcome: Int8Outcome
    shipped: bool  # outcome == "kept"
    faster: bool | None  # None: not measured (or no int8 version)
    speedup: float | None  # fp32 served p50 / int8 served p50 at batch 1
    drop: float | None  # fp32 - int8 top-1, points
    max_drop: float | None
    reason: str  # the numbers: drop against its limit, medians, speedup and its interval

    @property
    def summary(self) -> str:
        """What tables show: ``faster: kept``, ``not faster: not shipped``, ``drop 1.30 > 1.00: not shipped``
        (``not measured: not shipped``; ``off`` without quantization)."""
        if self.outcome == "kept":
            return "faster: kept"
        if self.outcome == "not faster":
            return "not faster: not shipped"
        if self.outcome == "drop":
            return f"drop {self.drop:.2f} > {self.max_drop:.2f}: not shipped"
        if self.outcome == "not measured":
            return "not measured: not shipped"
        return "off"


class MeasurementsRecord(Record):
    """The measure step: every student at every precision through the model server on the step's machine,
    and each int8 version's verdict. ``measurements.json``."""

    FORMAT: ClassVar[str] = "bockd-measurements/1"
    FILENAME: ClassVar[str] = "measurements.json"
    enabled: bool  # False: measurement was off; selection falls back to the evaluate step's forward latency
    options: dict[str, Any]  # the validated measurement options
    machine: MachineInfo | None
    measurements: list[StudentMeasurement]  # in the order they were taken
    int8: list[Int8Verdict]  # one per student that has a quantization record

    def of(self, student: int, precision: str = "fp32") -> StudentMeasurement | None:
        return next((m for m in self.measurements if m.student == student and m.precision == precision), None)

    def verdict(self, student: int) -> Int8Verdict | None:
        return next((v for v in self.int8 if v.student == student), None)


class CascadeStageResult(_Model):
    """One student of the cascade: the variant it runs as, its cost, threshold and share of the answers."""

    student: int
    label: str
    precision: Precision  # int8 only when its verdict shipped it (within its drop limit and faster)
    precision_reason: str  # why this precision: the int8 verdict's summary, or that there is none
    student_name: str  # the variant's own name ("resnet20-s5-int8")
    params: int | None
    cost_ms: float  # per image, the cascade's cost model (see CascadeRecord.cost_basis)
    threshold: float | None  # None for the last stage; > 1 (bockd.cascade.NEVER): never answers, not run
    val_exit_fraction: float  # share of the validation images it answered in the fit
    test_exit_fraction: float  # share of the test images it answered
    test_top1: float  # the student alone on the test split, percent


class CascadeFitSummary(_Model):
    """`bockd.cascade.CascadeFit` as recorded: the fit on the validation split (top-1 in percent, cost in ms
    per image, ``val_reference_top1`` = the largest chosen student alone)."""

    thresholds: list[float]
    target_top1: float
    val_top1: float
    val_reference_top1: float
    expected_cost_ms: float
    exit_fractions: list[float]
    reached: bool  # False: the target was out of reach and the largest student answers alone
    num_val: int
    search: str


class CascadeRecord(Record):
    """The cascade step: ``cascade-result.json`` of its Model artifact, the servable cascade folder
    (`bockd.cascade.build_cascade`, whose own card is ``cascade.json``, format ``bockd-cascade/1``) in its
    ``cascade/`` sub-folder when fitted.

    ``status`` "skipped" (cascade off, or no validation split to fit on): ``reason`` says why and nothing
    else is set. "fitted": thresholds fitted on the validation split only, then the cascade, the largest
    chosen student alone (the ``reference``) and each student alone scored on the test split. Costs are
    ms per image under ``cost_basis``; accuracies percent.
    """

    FORMAT: ClassVar[str] = "bockd-cascade-result/1"
    FILENAME: ClassVar[str] = "cascade-result.json"
    CASCADE_DIR: ClassVar[str] = "cascade"
    status: Literal["fitted", "skipped"]
    reason: str = ""  # skipped: why ("no validation split (set data.val_fraction)")
    verdict: str  # one line: "cheaper than S1 alone ...", "not cheaper: ...", "skipped: ..."
    stages: list[CascadeStageResult] = []  # smallest student first: the escalation order
    thresholds: list[float] = []  # one per stage but the last
    cost_basis: str = ""  # where the stage costs come from
    max_drop: float | None = None  # the target rule: the largest student's val top-1 minus this ...
    fit: CascadeFitSummary | None = None  # ... or the target_top1 the options gave (fit.target_top1)
    test_top1: float | None = None
    test_cost_ms: float | None = None  # expected, per image
    test_exit_fractions: list[float] = []
    reference_top1: float | None = None  # the largest chosen student alone, on the test split
    reference_cost_ms: float | None = None
    cheaper: bool = False  # test_cost_ms < reference_cost_ms (beyond rounding)
    num_test: int | None = None
    test_set: str = ""  # sha256 of the prepared dataset

    @property
    def fitted(self) -> bool:
        return self.status == "fitted"

    @property
    def order(self) -> str:
        """``S5 (int8) -> S3 -> S1``: the escalation order with the int8 stages marked."""
        return " -> ".join(f"{s.label}{' (int8)' if s.precision == 'int8' else ''}" for s in self.stages)

    @property
    def reference_label(self) -> str:
        return self.stages[-1].label if self.stages else ""


class Registration(_Model):
    """One student at one precision as an MLflow registered model version (int8 beside fp32: the same
    registered model, another version, tagged ``precision``)."""

    student: int
    registered_model: str
    version: str
    created: bool  # False: the version existed already (a re-run registers nothing)
    precision: Precision = "fp32"


class CascadeRegistration(_Model):
    """The cascade folder as its own MLflow registered model (``{prefix}-{dataset}-{arch}-cascade``),
    a version per training run, tagged ``kind=cascade``."""

    registered_model: str
    version: str
    created: bool  # False: the version existed already (a re-run registers nothing)


class Registrations(Record):
    FORMAT: ClassVar[str] = "bockd-registrations/2"
    FILENAME: ClassVar[str] = "registrations.json"
    registrations: list[Registration]
    cascade: CascadeRegistration | None = None  # None: no cascade was fitted

    def of(self, student: int, precision: str = "fp32") -> Registration | None:
        return next(
            (r for r in self.registrations if r.student == student and r.precision == precision), None
        )


class Promotion(_Model):
    """Whether a chosen student's version became its model's ``@champion``, and why (not)."""

    student: int
    registered_model: str
    promoted: bool
    message: str


class Pick(_Model):
    """The precision a chosen student is deployed (and promoted) at."""

    student: int
    precision: Precision


class SelectionRecord(Record):
    """The selection policy applied: every candidate's verdict with its reason (each student at fp32 and,
    where it has one, int8), the chosen students, the precision each is deployed at, promotions."""

    FORMAT: ClassVar[str] = "bockd-selection/2"
    FILENAME: ClassVar[str] = "selection.json"
    policy: dict[str, Any]  # the validated policy, unset rules left out
    selection: Selection  # the selection engine's verdicts (its candidates' ``index`` is 0-based)
    chosen: list[int]  # student numbers, ascending
    promotions: list[Promotion]
    markdown: str  # the verdicts as a Markdown table
    picks: list[Pick] = []  # one per chosen student; none (older records): every one at fp32

    def precision_of(self, student: int) -> Precision:
        """The precision ``student`` is deployed at (fp32 unless its int8 version was chosen)."""
        return next((p.precision for p in self.picks if p.student == student), "fp32")


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
    latency_ms: float | None  # p50 at batch 1: served when measured, else the evaluate step's forward
    registered_model: str | None
    version: str | None  # the deployed precision's version when selected, else the fp32 one
    selected: bool
    served_p50_ms: float | None = None  # through the model server, batch 1 (None: not measured)
    size_bytes: int | None = None  # model.onnx on disk
    int8_top1: float | None = None
    int8_served_p50_ms: float | None = None
    int8_outcome: str | None = None  # Int8Verdict.summary ("faster: kept", ...); None: no int8 version
    precision: Precision | None = None  # what is deployed, when selected


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
    precision: Precision = "fp32"


class CascadeEndpoint(_Model):
    """The deployed cascade (``deploy_options.cascade``): one endpoint serving the chosen students."""

    registered_model: str
    version: str
    url: str
    labels: list[str]  # its students, smallest first ("S5", "S3", "S1"): what each answer's ``student`` says


class Endpoints(Record):
    FORMAT: ClassVar[str] = "bockd-endpoints/2"
    FILENAME: ClassVar[str] = "endpoints.json"
    endpoints: list[Endpoint]
    cascade: CascadeEndpoint | None = None  # None: the cascade was not deployed


def read_records(record: type[R], folders: list[str | Path]) -> list[R]:
    """One ``record`` from each folder (the artifacts a KFP ``dsl.Collected`` hands a step)."""
    return [record.read(f) for f in folders]
