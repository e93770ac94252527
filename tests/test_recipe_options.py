"""The training-recipe options beyond the paper: cosine schedule, distillation ramp-up, leave-one-out
teacher, class-balanced training subset, evaluation every k epochs, and the baseline identity."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import rounding_tolerance

from bockd.config import build_config
from bockd.data import load_dataset
from bockd.data.splits import balanced_subset
from bockd.engine import Trainer, load_training_data
from bockd.errors import ConfigError, DataError
from bockd.losses import BOCKDLoss, KDTerm, teacher_logits

TINY = {"model": {"arch": "resnet20", "num_students": 3}, "batch_size": 64, "runtime": {"progress": "off"}}
COSINE = {"schedule": "cosine", "milestones": []}


# -- schedule -----------------------------------------------------------------------------------------------


def test_cosine_schedule_falls_from_lr_towards_zero() -> None:
    config = build_config("smoke", {"epochs": 10, "optim": {**COSINE, "lr": 0.2}})
    lrs = [config.lr_at(e) for e in range(10)]
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[5] == pytest.approx(0.1)  # half-way: half the lr
    assert lrs[9] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_a_cosine_schedule_refuses_milestones() -> None:
    with pytest.raises(ConfigError, match=r"optim.*cosine schedule takes no milestones"):
        build_config(
            "smoke-paper", {"optim": {"schedule": "cosine"}}
        )  # the preset's milestones are still set


# -- ramp-up ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rampup", "length"), [(0.3, 9.0), (6, 6.0)])
def test_rampup_is_a_fraction_or_epochs_and_follows_the_sigmoid(rampup: float, length: float) -> None:
    config = build_config("smoke", {"epochs": 30, "loss": {"rampup": rampup}})
    assert config.rampup_epochs() == pytest.approx(length)
    assert config.distill_scale(0) == pytest.approx(math.exp(-5))
    assert config.distill_scale(length / 2) == pytest.approx(math.exp(-5 * 0.25))
    assert config.distill_scale(length) == 1.0 and config.distill_scale(29.9) == 1.0
    scales = [config.distill_scale(e / 4) for e in range(int(length * 4) + 1)]
    assert all(a < b for a, b in itertools.pairwise(scales))


def test_no_rampup_means_full_weight_from_the_first_step() -> None:
    config = build_config("smoke-paper", {})
    assert config.loss.rampup == 0 and config.distill_scale(0) == 1.0


def test_a_rampup_longer_than_training_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"loss\.rampup"):
        build_config("smoke", {"epochs": 5, "loss": {"rampup": 8}})


def test_distill_scale_multiplies_only_hint_and_kd() -> None:
    torch.manual_seed(0)
    logits = [torch.randn(8, 10) for _ in range(3)]
    y = torch.randint(0, 10, (8,))
    feats = [torch.randn(8, 4)]
    adapted = [[torch.randn(8, 4)], [torch.randn(8, 4)]]
    loss = BOCKDLoss(1.0, 0.3, 0.2)
    full, scaled = loss(logits, y, feats, adapted), loss(logits, y, feats, adapted, distill_scale=0.25)
    expected = full.ce.sum() + 0.25 * (0.3 * full.hint.sum() + 0.2 * full.kd.sum())
    assert scaled.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(scaled.kd, full.kd) and torch.equal(scaled.hint, full.hint)


# -- teacher ------------------------------------------------------------------------------------------------


def test_leave_one_out_teacher_is_the_mean_of_the_other_students() -> None:
    torch.manual_seed(0)
    stacked = torch.randn(4, 5, 10)
    loo = teacher_logits(stacked, "leave-one-out")
    # (sum of all - own) / 3 vs the mean of the other 3: sums of 4 terms rounded in another order, so
    # they agree to rounding of the largest partial sum, sum |logits|.
    tol = rounding_tolerance(stacked.abs().sum(0).max().item(), terms=4)
    for i in range(4):
        others = torch.cat([stacked[:i], stacked[i + 1 :]]).mean(0)
        assert (loo[i] - others).abs().max().item() <= tol
    mean = teacher_logits(stacked, "mean")
    assert all((mean[i] - stacked.mean(0)).abs().max().item() <= tol for i in range(4))


def test_leave_one_out_kd_matches_its_definition_and_sends_no_gradient_to_the_teacher() -> None:
    torch.manual_seed(1)
    logits = [torch.randn(6, 10, requires_grad=True) for _ in range(3)]
    t = 2.0
    kd = KDTerm(t, teacher="leave-one-out")(logits)
    # Two float32 routes to the same KL: log-probabilities carry rounding of max |z| / T + log C, the KL
    # sums C = 10 of them weighted by probabilities <= 1, times T^2.
    tol = t * t * rounding_tolerance(max(z.abs().max().item() for z in logits) / t + math.log(10), terms=10)
    for i, z in enumerate(logits):
        teacher = torch.stack([w for j, w in enumerate(logits) if j != i]).mean(0).detach()
        p_t = F.softmax(teacher / t, dim=1)
        expected = (p_t * (p_t.log() - F.log_softmax(z.detach() / t, dim=1))).sum(1).mean() * t * t
        assert abs(kd[i].item() - expected.item()) <= tol
    kd[0].backward()  # student 1's term moves student 1 only: the others are its (detached) teacher
    assert logits[0].grad is not None and logits[0].grad.abs().sum() > 0
    assert all(z.grad is None or not z.grad.any() for z in logits[1:])


def test_wider_teacher_is_the_mean_of_the_wider_students() -> None:
    torch.manual_seed(2)
    stacked = torch.randn(4, 5, 10)
    wider = teacher_logits(stacked, "wider")
    assert wider.shape == stacked.shape
    tol = rounding_tolerance(stacked.abs().sum(0).max().item(), terms=4)
    assert torch.equal(wider[0], stacked[0])  # S1: no wider student (KDTerm gives it no term)
    for i in range(1, 4):
        assert (wider[i] - stacked[:i].mean(0)).abs().max().item() <= tol
    assert torch.equal(wider[1], stacked[0])  # S2 learns from S1 alone


def test_wider_kd_leaves_s1_alone_and_moves_each_student_only() -> None:
    torch.manual_seed(3)
    logits = [torch.randn(6, 10, requires_grad=True) for _ in range(3)]
    kd = KDTerm(2.0, teacher="wider")(logits)
    assert kd.shape == (3,) and kd[0].item() == 0.0 and (kd[1:] > 0).all()
    kd.sum().backward()  # S1 is only ever a (detached) teacher: no gradient reaches it
    assert logits[0].grad is None or not logits[0].grad.any()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in logits[1:])
    # In the full loss with a wider teacher, S1's KD is zero whatever the weight.
    out = BOCKDLoss(1.0, 0.0, 1.0, 3.0, teacher="wider")(
        [z.detach() for z in logits], torch.zeros(6, dtype=torch.long)
    )
    assert out.kd[0].item() == 0.0
    assert build_config("smoke", {"loss": {"teacher": "wider"}}).loss.teacher == "wider"


def test_unknown_teacher_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match=r"loss\.teacher"):
        build_config("smoke", {"loss": {"teacher": "best"}})


# -- training subset ----------------------------------------------------------------------------------------


def test_balanced_subset_is_balanced_seeded_and_sorted() -> None:
    y = np.repeat(np.arange(4), [50, 30, 40, 60])
    idx = balanced_subset(y, 22, seed=3)
    counts = np.bincount(y[idx], minlength=4)
    assert sorted(counts.tolist()) == [5, 5, 6, 6] and counts.sum() == 22
    assert np.array_equal(idx, np.sort(idx)) and len(set(idx.tolist())) == 22
    assert np.array_equal(idx, balanced_subset(y, 22, seed=3))
    assert not np.array_equal(idx, balanced_subset(y, 22, seed=4))


@pytest.mark.parametrize(
    ("size", "match"), [(0, "expected 1..180"), (3, "cannot hold all 4"), (181, "1..180")]
)
def test_balanced_subset_refuses_impossible_sizes(size: int, match: str) -> None:
    y = np.repeat(np.arange(4), 45)
    with pytest.raises(DataError, match=match):
        balanced_subset(y, size, seed=0)


def test_balanced_subset_refuses_a_class_too_small() -> None:
    y = np.repeat(np.arange(3), [100, 100, 2])
    with pytest.raises(DataError, match="class 2 has 2 training images"):
        balanced_subset(y, 30, seed=0)


def test_train_subset_shrinks_train_only_and_comes_before_the_validation_split() -> None:
    config = build_config("smoke", {"data": {"train_subset": 500, "val_fraction": 0.2}})
    full = load_dataset("digits", seed=0)
    data = load_training_data(config)
    assert len(data.train) + len(data.val) == 500 and len(data.val) == 100
    assert np.bincount(data.train.y, minlength=10).min() >= 39  # balanced: 50 per class, 10 held out
    assert data.test.x.shape == full.test.x.shape and np.array_equal(data.test.y, full.test.y)
    assert load_training_data(config).sha256() == data.sha256()


# -- evaluation every k epochs, baseline identity -----------------------------------------------------------


def test_eval_every_scores_every_kth_and_the_last_epoch(tmp_path: Path) -> None:
    config = build_config("smoke", {**TINY, "epochs": 5, "runtime": {"progress": "off", "eval_every": 2}})
    result = Trainer(config, load_dataset("digits", seed=0), tmp_path).fit()
    scored = [int(h["epoch"]) for h in result.history if "test/s1/top1" in h]
    assert scored == [2, 4, 5]
    assert result.summary()["students"]["s1"]["best_epoch"] in scored


def test_rampup_is_reported_per_epoch(tmp_path: Path) -> None:
    config = build_config("smoke", {**TINY, "epochs": 3, "loss": {"rampup": 2}})
    trainer = Trainer(config, load_dataset("digits", seed=0), tmp_path)
    scales = [h["train/distill_scale"] for h in trainer.fit().history]
    assert scales[0] < scales[1] < scales[2] == 1.0
    steps = len(trainer.train_loader)  # the scale moves every step: the epoch reports its mean
    assert scales[0] == pytest.approx(np.mean([config.distill_scale(i / steps) for i in range(steps)]))


def test_a_baselines_identity_ignores_the_loss_settings() -> None:
    """A baseline trains on cross-entropy alone, so two recipes with one schedule share its run."""
    a = build_config("smoke-paper", {"mode": "baseline", "student": 1})
    b = build_config(
        "smoke-paper", {"mode": "baseline", "student": 1, "loss": {"kd_weight": 1.0, "rampup": 0.5}}
    )
    assert a.training_identity() == b.training_identity()
    c = build_config("smoke-paper", {"mode": "baseline", "student": 1, "optim": COSINE})
    assert a.training_identity() != c.training_identity()
    ens_a, ens_b = build_config("smoke-paper", {}), build_config("smoke-paper", {"loss": {"kd_weight": 2.0}})
    assert ens_a.training_identity() != ens_b.training_identity()
