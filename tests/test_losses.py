"""The BOC-KD objective: values, weights, and where gradients may and may not flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import rounding_tolerance

from bockd.losses import BOCKDLoss, CrossEntropyTerm, HintTerm, KDTerm, baseline_loss
from bockd.models import create_model


def _logits(n: int = 3, b: int = 4, c: int = 5, scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, c, generator=g) * scale).requires_grad_() for _ in range(n)]


def _kd_tolerance(logits: list[torch.Tensor], t: float) -> float:
    """KD from two float32 routes (log_softmax + kl_div vs the definition in float64): each
    log-probability carries rounding of the numbers log-softmax subtracts (max |z| / T and log C), the
    KL sums C of them weighted by probabilities <= 1, and the result is scaled by T^2."""
    classes = logits[0].shape[-1]
    scale = max(z.abs().max().item() for z in logits) / t + math.log(classes)
    return t * t * rounding_tolerance(scale, classes)


def test_ce_is_per_student_batch_mean() -> None:
    logits, y = _logits(), torch.tensor([0, 1, 2, 3])
    ce = CrossEntropyTerm()(logits, y)
    assert ce.shape == (3,)
    for k, z in enumerate(logits):
        assert torch.allclose(ce[k], F.cross_entropy(z, y))


def test_kd_matches_definition_with_t_squared() -> None:
    logits = _logits()
    t = 2.0
    kd = KDTerm(t, t_squared=True)(logits)
    exact = [z.detach().double() for z in logits]
    teacher = torch.softmax(torch.stack(exact).mean(0) / t, -1)
    tol = _kd_tolerance(logits, t)
    for k, z in enumerate(exact):
        student = torch.softmax(z / t, -1)
        expected = (teacher * (teacher.log() - student.log())).sum(-1).mean() * t * t
        assert abs(kd[k].item() - expected.item()) <= tol
    assert torch.equal(KDTerm(t, t_squared=False)(logits) * t * t, kd)  # same arithmetic, then * 4 (exact)


def test_kd_zero_when_all_students_agree() -> None:
    z = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    logits = [z.clone().requires_grad_() for _ in range(5)]
    kd = KDTerm(2.0)(logits)
    # The mean of 5 equal logits is z only up to rounding (4 additions), hence a rounding tolerance.
    assert kd.abs().max().item() <= _kd_tolerance(logits, 2.0)


def test_kd_teacher_target_receives_no_gradient() -> None:
    """Only the student side of each KL term is differentiated: the mean-logit teacher is a constant.

    With a detached teacher, d KD_k / d z_j is zero for j != k (student j only enters the teacher)."""
    logits = _logits(n=3)
    kd = KDTerm(2.0)(logits)
    grads = torch.autograd.grad(kd[0], logits, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None or torch.all(grads[1] == 0)
    assert grads[2] is None or torch.all(grads[2] == 0)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_finite_loss_and_gradients_for_huge_logits(scale: float) -> None:
    logits = _logits(n=4, scale=scale)
    logits[0] = (torch.eye(4, 5) * scale).requires_grad_()  # saturated one-hot logits
    y = torch.tensor([0, 1, 2, 3])
    out = BOCKDLoss()(logits, y)
    assert math.isfinite(out.total.item())
    out.total.backward()
    for z in logits:
        assert torch.isfinite(z.grad).all()


def test_hint_never_moves_the_pseudo_teacher_features() -> None:
    teacher = [torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 16, 2, 2, requires_grad=True)]
    adapted = [[torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 16, 2, 2, requires_grad=True)]]
    hint = HintTerm()(teacher, adapted)
    assert hint[0] == 0  # S1 has no hint term
    expected = F.mse_loss(adapted[0][0], teacher[0]) + F.mse_loss(adapted[0][1], teacher[1])
    assert torch.allclose(hint[1], expected)
    hint.sum().backward()
    assert teacher[0].grad is None and teacher[1].grad is None
    assert adapted[0][0].grad is not None and adapted[0][0].grad.abs().sum() > 0


def test_total_is_the_weighted_sum_of_terms() -> None:
    logits, y = _logits(n=2), torch.tensor([0, 1, 2, 3])
    teacher = [torch.randn(4, 3, 2, 2)]
    adapted = [[torch.randn(4, 3, 2, 2)]]
    loss = BOCKDLoss(0.5, 0.2, 0.3, temperature=3.0)
    out = loss(logits, y, teacher, adapted)
    expected = 0.5 * out.ce.sum() + 0.2 * out.hint.sum() + 0.3 * out.kd.sum()
    assert torch.allclose(out.total, expected)
    assert out.kd.sum() > 0 and out.hint.sum() > 0


def test_baseline_loss_is_plain_cross_entropy() -> None:
    z, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(baseline_loss(z, y).total, F.cross_entropy(z, y))


def _ensemble_loss(model, x, y):
    out = model(x)
    adapted = [model.adapt(i, out.features[i]) for i in range(1, model.num_students)]
    return BOCKDLoss()(out.logits, y, out.features[0], adapted)


def test_base_receives_gradient_from_every_student() -> None:
    """Each student's own loss alone must reach the shared base: the base is trained by all of them."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, num_students=3)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    out = model(x)
    base_params = list(model.base.parameters())
    for k in range(3):
        grads = torch.autograd.grad(F.cross_entropy(out.logits[k], y), base_params, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), f"S{k + 1} does not reach the base"


def test_hint_gradient_reaches_adapters_and_students_but_not_s1_branch() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, num_students=3)
    out = model(torch.randn(2, 3, 16, 16))
    adapted = [model.adapt(i, out.features[i]) for i in range(1, 3)]
    hint = HintTerm()(out.features[0], adapted).sum()
    hint.backward()
    s1_grads = [p.grad for p in model.branches[0].parameters()]
    assert all(g is None or torch.all(g == 0) for g in s1_grads), "the hint target S1 must not move"
    for i in (1, 2):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters[i - 1].parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.branches[i].parameters())


def test_full_loss_step_gives_finite_gradients_everywhere() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, num_students=5)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    out = _ensemble_loss(model, x, y)
    out.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
