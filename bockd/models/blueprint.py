"""The contract between an architecture and the ensemble: a shared base and a branch per student."""

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


class Branch(nn.Module):
    """One student's private part: maps the base's output to ``(logits, stage outputs)``.

    Subclasses set ``stage_channels`` (one entry per stage) so the ensemble can size the hint adapters
    without running a forward pass.
    """

    stage_channels: list[int]

    def forward(self, h: Tensor) -> tuple[Tensor, list[Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Blueprint:
    """What a registered builder returns: factories rather than modules.

    Factories let the registry build only the parts it needs (one branch for ``build_student``, modules on
    the meta device for ``student_table``) instead of always materializing all N branches.
    """

    make_base: Callable[[], nn.Module]
    make_branch: Callable[[int], Branch]  # 0-based student index -> fresh branch
    max_students: int  # the narrowest scaled channel count: more students would leave a branch 0 wide
