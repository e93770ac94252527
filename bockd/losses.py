"""The BOC-KD objective as small named terms combined by weights (torchdistill style).

Every term returns one value per student (a tensor of shape [N]) so the engine can log each student's
share without extra passes; the total is ``ce_w * sum(CE) + hint_w * sum(hint) + kd_w * sum(KD)``.
All terms are computed in float32 even under bf16 autocast: the KD term divides logits by T and
compares log-probabilities, which bf16 rounds too coarsely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CrossEntropyTerm(nn.Module):
    """Cross-entropy of every student against the labels (batch mean). No CE on the ensemble teacher."""

    def forward(self, logits: list[Tensor], targets: Tensor) -> Tensor:
        return torch.stack([F.cross_entropy(z.float(), targets) for z in logits])


class HintTerm(nn.Module):
    """MSE between each compressed student's adapted stage features and the pseudo teacher's (S1's).

    S1's features are detached: the hint pulls students towards S1, never S1 towards them. S1's own
    entry is zero. ``adapted[i - 1]`` holds student i's features already mapped by its 1x1 adapters.
    """

    def forward(self, teacher_features: list[Tensor], adapted: list[list[Tensor]]) -> Tensor:
        zero = teacher_features[0].new_zeros((), dtype=torch.float32)
        per_student = [zero]
        for features in adapted:
            terms = [
                F.mse_loss(a.float(), t.detach().float())
                for a, t in zip(features, teacher_features, strict=True)
            ]
            per_student.append(torch.stack(terms).sum())
        return torch.stack(per_student)


TEACHERS = ("mean", "leave-one-out", "wider")


def teacher_logits(stacked: Tensor, teacher: str = "mean") -> Tensor:
    """The detached teacher logits of every student, shape [N, B, C], from the students' [N, B, C].

    ``"mean"``: every student's teacher is the mean of all N students' logits (BOC-KD's ensemble).
    ``"leave-one-out"``: student i's teacher is the mean of the other N - 1 students' logits, so no
    student is pulled towards a target that holds its own prediction.
    ``"wider"``: student i's teacher is the mean of the students wider than it (S1..S(i-1), students are
    ordered widest first), so no student learns from narrower, weaker peers; S1 has none, and its row is
    its own (detached) logits: `KDTerm` gives it no KD term at all.
    """
    n = stacked.shape[0]
    detached = stacked.detach()
    total = detached.sum(0)
    if teacher == "mean":
        return (total / n).expand_as(stacked)
    if teacher == "leave-one-out":
        return (total.unsqueeze(0) - detached) / (n - 1)
    if teacher == "wider":
        # Row i: the sum of rows 0..i-1 over i; row 0 keeps its own logits (no wider student).
        counts = torch.arange(1, n, device=stacked.device, dtype=stacked.dtype).view(-1, 1, 1)
        wider = detached.cumsum(0)[:-1] / counts
        return torch.cat([detached[:1], wider])
    raise ValueError(f"teacher: expected one of {TEACHERS}, got {teacher!r}")


class KDTerm(nn.Module):
    """KL(teacher || student) at temperature T for every student, S1 included (except with the
    ``"wider"`` teacher, which leaves S1 none), shape [N].

    The teacher (``teacher_logits``) is detached. Both distributions are log-softmaxes and
    ``kl_div(..., log_target=True)`` compares them directly: ``softmax().log()`` would turn an
    underflowed probability into -inf and the loss into NaN for large logits.
    """

    def __init__(self, temperature: float = 2.0, t_squared: bool = True, teacher: str = "mean") -> None:
        super().__init__()
        if teacher not in TEACHERS:
            raise ValueError(f"teacher: expected one of {TEACHERS}, got {teacher!r}")
        self.temperature = temperature
        self.t_squared = t_squared
        self.teacher = teacher

    def forward(self, logits: list[Tensor]) -> Tensor:
        t = self.temperature
        stacked = torch.stack([z.float() for z in logits])
        teacher_log_p = F.log_softmax(teacher_logits(stacked, self.teacher) / t, dim=-1)
        scale = t * t if self.t_squared else 1.0
        terms = [
            F.kl_div(F.log_softmax(z / t, dim=-1), target, reduction="batchmean", log_target=True)
            for z, target in zip(stacked, teacher_log_p, strict=True)
        ]
        if self.teacher == "wider":  # S1 has no wider teacher: an exact zero, not a KL of ~1e-8 to itself
            terms[0] = stacked.new_zeros(())
        return torch.stack(terms) * scale


@dataclass
class LossOutput:
    total: Tensor
    ce: Tensor  # [N]
    hint: Tensor  # [N]
    kd: Tensor  # [N]


class BOCKDLoss(nn.Module):
    """0.7 * CE + 0.15 * hint + 0.15 * KD by default (DESIGN.md section 1).

    ``distill_scale`` in ``forward`` multiplies the hint and KD weights (the ramp-up, 1 without one).
    """

    def __init__(
        self,
        ce_weight: float = 0.7,
        hint_weight: float = 0.15,
        kd_weight: float = 0.15,
        temperature: float = 2.0,
        kd_t_squared: bool = True,
        teacher: str = "mean",
    ) -> None:
        super().__init__()
        self.ce_weight, self.hint_weight, self.kd_weight = ce_weight, hint_weight, kd_weight
        self.ce = CrossEntropyTerm()
        self.hint = HintTerm()
        self.kd = KDTerm(temperature, kd_t_squared, teacher)

    def forward(
        self,
        logits: list[Tensor],
        targets: Tensor,
        teacher_features: list[Tensor] | None = None,
        adapted: list[list[Tensor]] | None = None,
        distill_scale: float = 1.0,
    ) -> LossOutput:
        ce = self.ce(logits, targets)
        zeros = torch.zeros_like(ce)
        hint = self.hint(teacher_features, adapted) if self.hint_weight and adapted else zeros
        kd = self.kd(logits) if self.kd_weight and len(logits) > 1 else zeros
        distill = self.hint_weight * hint.sum() + self.kd_weight * kd.sum()
        total = self.ce_weight * ce.sum() + distill_scale * distill
        return LossOutput(total=total, ce=ce, hint=hint, kd=kd)


def baseline_loss(logits: Tensor, targets: Tensor) -> LossOutput:
    """A baseline student trains on cross-entropy alone."""
    ce = F.cross_entropy(logits.float(), targets).reshape(1)
    zeros = torch.zeros_like(ce)
    return LossOutput(total=ce.sum(), ce=ce, hint=zeros, kd=zeros)
