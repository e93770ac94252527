"""The options of the quantize, measure and cascade steps: the ``quantization``, ``measurement`` and
``cascade`` parameters.

All three are plain dicts in the pipeline (KFP parameters hold JSON); these models validate them
before a run starts (`bockd.pipeline.parameters.RunParameters`) and again in the step that reads them, with
errors that name the parameter and the field. Unset keys take the defaults below.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bockd.config import format_validation_errors
from bockd.errors import ConfigError
from bockd.platform.serving_benchmark import MIN_SAMPLES

__all__ = [
    "DEFAULT_CASCADE",
    "DEFAULT_MEASUREMENT",
    "DEFAULT_QUANTIZATION",
    "DEFAULT_VAL_FRACTION",
    "CascadeOptions",
    "MeasurementOptions",
    "QuantizationOptions",
]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    PARAMETER: ClassVar[str] = ""

    @classmethod
    def from_mapping(cls, raw: dict[str, Any] | None) -> Self:
        """The validated options of a pipeline parameter; errors are ConfigError naming the field."""
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{cls.PARAMETER}: expected a mapping, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw or {})
        except ValidationError as err:
            msg = format_validation_errors(err).replace("invalid config:", f"invalid {cls.PARAMETER}:", 1)
            raise ConfigError(msg) from None


class QuantizationOptions(_Options):
    """``quantization``: an int8 version of every student (ONNX Runtime static quantization, QDQ, int8
    per-channel weights, uint8 activations calibrated on training images; `bockd.quantize`)."""

    PARAMETER: ClassVar[str] = "quantization"
    enabled: bool = True
    max_drop: float = Field(1.0, ge=0, le=100)  # top-1 points the int8 student may lose against fp32
    calibration_images: int = Field(512, ge=1, le=100_000)  # drawn from the training split, seeded
    per_channel: bool = True  # one weight scale per output channel
    reduce_range: bool = False  # 7-bit weights (x86 CPUs without VNNI)


class MeasurementOptions(_Options):
    """``measurement``: every student (fp32 and int8) through the real model server on the step's machine
    (`bockd.platform.serving_benchmark`)."""

    PARAMETER: ClassVar[str] = "measurement"
    enabled: bool = True
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    requests: int = Field(30, ge=MIN_SAMPLES, le=100_000)  # timed requests at batch 1 (the faster rule's)
    batch_requests: int = Field(8, ge=1, le=100_000)  # timed requests at each larger batch size
    warmup: int = Field(3, ge=0, le=10_000)  # untimed requests (and raw forwards) per batch size
    threads: int = Field(1, ge=1, le=256)  # ONNX Runtime intra-op threads, server and raw forward
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of the bootstrap interval of the int8 speedup
    min_speedup: float = Field(1.0, ge=1.0, le=100)  # the interval's lower end must exceed this

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, sizes: list[int]) -> list[int]:
        # Batch 1 is what selection's latency and the faster rule read; 256 is the server's default limit.
        if 1 not in sizes:
            raise ValueError("must include 1 (selection and the int8 faster rule use batch 1)")
        if any(not 1 <= b <= 256 for b in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError("expected distinct batch sizes in 1..256")
        return sorted(sizes)

    def requests_at(self, batch: int) -> int:
        """Timed requests at ``batch`` images per request."""
        return self.requests if batch == 1 else self.batch_requests


# The share of the training split the pipeline holds out as the validation split the cascade is fitted on,
# unless the training config says otherwise (its own default, 0, holds out nothing).
DEFAULT_VAL_FRACTION = 0.1


class CascadeOptions(_Options):
    """``cascade``: one endpoint of several students of the run, the smallest answering first and escalating
    what it is unsure of (`bockd.cascade`); its thresholds are fitted on the prepared dataset's validation
    split (``data.val_fraction`` > 0) to reach a target top-1 at the lowest expected cost.

    ``students``: student numbers (1 = S1, the largest); empty = the smallest, the middle and the largest
    of the family (S5, S3, S1 of five). Stored smallest first (the escalation order); checked against the
    family by `students_of`. The target is ``target_top1`` (%) when given, else the largest chosen
    student's validation top-1 minus ``max_drop`` points; give one of the two.
    """

    PARAMETER: ClassVar[str] = "cascade"
    enabled: bool = True
    students: list[int] = Field(default_factory=list)
    max_drop: float = Field(0.5, ge=0, le=100)  # points of validation top-1 below the largest student's
    target_top1: float | None = Field(None, gt=0, le=100)  # percent; replaces max_drop

    @field_validator("students")
    @classmethod
    def _students(cls, students: list[int]) -> list[int]:
        if students and (len(students) < 2 or len(set(students)) != len(students) or min(students) < 1):
            raise ValueError("expected at least 2 distinct student numbers >= 1 (or [] for the default)")
        return sorted(students, reverse=True)  # S5 is the smallest: the highest number answers first

    @classmethod
    def from_mapping(cls, raw: dict[str, Any] | None) -> Self:
        # Both given would leave one silently ignored: refuse it, naming the field.
        if isinstance(raw, dict) and raw.get("target_top1") is not None and "max_drop" in raw:
            raise ConfigError(
                "invalid cascade:\n  target_top1: give max_drop or target_top1, not both (target_top1 "
                "replaces the largest student's top-1 minus max_drop)"
            )
        return super().from_mapping(raw)

    def students_of(self, num_students: int) -> list[int]:
        """The chosen student numbers for a family of ``num_students``, smallest student first.

        Default: the smallest, the middle and the largest (``[5, 3, 1]`` of 5, ``[2, 1]`` of 2). Raises
        ConfigError naming ``cascade.students`` when a number is not in the family."""
        if not self.students:
            return sorted({num_students, (num_students + 1) // 2, 1}, reverse=True)
        bad = [k for k in self.students if k > num_students]
        if bad:
            raise ConfigError(
                f"cascade.students: {bad} not in the family of {num_students} students (1..{num_students})"
            )
        return list(self.students)

    def stored(self) -> dict[str, Any]:
        """As a pipeline parameter: complete, no nulls (KFP parameters cannot hold them), and without
        ``max_drop`` when ``target_top1`` replaces it (so it validates again)."""
        exclude = {"max_drop"} if self.target_top1 is not None else None
        return self.model_dump(exclude_none=True, exclude=exclude)


DEFAULT_QUANTIZATION = QuantizationOptions().model_dump()
DEFAULT_MEASUREMENT = MeasurementOptions().model_dump()
DEFAULT_CASCADE = CascadeOptions().stored()
