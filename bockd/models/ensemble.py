"""The BOC-KD network: one shared base feeding N parallel branches; student i = base + branch i."""

import copy
from typing import Any, NamedTuple

from torch import Tensor, nn

from bockd.errors import ConfigError
from bockd.models.blueprint import Branch
from bockd.models.initialization import init_weights


class EnsembleOutput(NamedTuple):
    """Per-student outputs, S1 first. A NamedTuple so tracing and export treat it as a plain tuple."""

    logits: list[Tensor]  # N tensors [B, num_classes]
    features: list[list[Tensor]]  # N lists of stage outputs [B, C_stage, H, W]


def count_parameters(module: nn.Module) -> int:
    """Learnable parameters only; BN running statistics are buffers and do not count."""
    return sum(p.numel() for p in module.parameters())


def _check_index(index: int, num_students: int, *, first: int = 0) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or not first <= index < num_students:
        raise ConfigError(
            f"index: expected a student index in {first}..{num_students - 1} (0-based, 0 = S1), got {index!r}"
        )


class Student(nn.Module):
    """One standalone student (base + its branch) that returns logits only; what gets exported and served."""

    def __init__(self, base: nn.Module, branch: Branch, spec: dict[str, Any]) -> None:
        super().__init__()
        self.base = base
        self.branch = branch
        self.spec = dict(spec)  # the ensemble spec plus "index": enough for build_student(**spec)

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = self.branch(self.base(x))
        return logits


class BranchedEnsemble(nn.Module):
    """Shared base + N branches + the hint adapters that map students 2..N onto S1's stage widths.

    The adapters live here (not in the loss) so that they exist, and reach the optimizer, from step one.
    """

    def __init__(self, base: nn.Module, branches: list[Branch], *, spec: dict[str, Any]) -> None:
        super().__init__()
        if len(branches) < 2:
            raise ConfigError(f"num_students: expected at least 2 branches, got {len(branches)}")
        stage_channels = [list(branch.stage_channels) for branch in branches]
        if len({len(channels) for channels in stage_channels}) != 1:
            raise ConfigError(f"branches: every branch needs the same number of stages, got {stage_channels}")
        self.base = base
        self.branches = nn.ModuleList(branches)
        self.num_students = len(branches)
        self.spec = dict(spec)
        self.stage_channels = stage_channels
        # adapters[i - 1][b]: 1x1 conv (with bias) from student i's stage-b channels to S1's.
        self.adapters = nn.ModuleList(
            nn.ModuleList(
                nn.Conv2d(channels_in, channels_out, kernel_size=1, bias=True)
                for channels_in, channels_out in zip(student_channels, stage_channels[0], strict=True)
            )
            for student_channels in stage_channels[1:]
        )
        init_weights(self.adapters)

    def forward(self, x: Tensor) -> EnsembleOutput:
        # The base runs once and its output feeds every branch, so every student's loss reaches the base.
        h = self.base(x)
        outputs = [branch(h) for branch in self.branches]
        return EnsembleOutput(
            logits=[logits for logits, _ in outputs],
            features=[features for _, features in outputs],
        )

    def adapt(self, index: int, features: list[Tensor]) -> list[Tensor]:
        """Map student ``index``'s (>= 1) stage features to S1's channel counts for the hint loss."""
        _check_index(index, self.num_students, first=1)
        adapters = self.adapters[index - 1]
        if len(features) != len(adapters):
            raise ConfigError(f"features: expected {len(adapters)} stage outputs, got {len(features)}")
        return [adapter(f) for adapter, f in zip(adapters, features, strict=True)]

    def student_parameter_count(self, index: int) -> int:
        """Parameters of student ``index`` = shared base + its branch (adapters are training-only)."""
        _check_index(index, self.num_students)
        return count_parameters(self.base) + count_parameters(self.branches[index])

    def extract_student(self, index: int) -> Student:
        """A standalone deep copy of base + branch ``index``; training the ensemble later leaves it alone."""
        _check_index(index, self.num_students)
        student = Student(
            copy.deepcopy(self.base), copy.deepcopy(self.branches[index]), {**self.spec, "index": index}
        )
        return student.train(self.training)
