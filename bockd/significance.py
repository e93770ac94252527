"""Whether a difference in top-1 accuracy is larger than the test set can resolve.

A top-1 measured on n test images is a binomial proportion: its standard error is sqrt(p (1 - p) / n)
(in points: 100 x that). Two models scored on the same n images differ by noise of about
sqrt(SE_a^2 + SE_b^2) (independent errors: conservative, since paired models share easy and hard images).
A gain counts only when its size exceeds ``NOISE_SIGMAS`` such standard errors (about 95 % two-sided).
The test set is fixed across seeds, so averaging seeds removes training noise but not this one: the band
does not shrink with the number of seeds. On sklearn's 360 digits test images at 95 % top-1 the band is
about ±3.2 points; on CIFAR-10's 10,000 at 90 %, about ±0.85.
"""

from __future__ import annotations

import math
from typing import Literal

NOISE_SIGMAS = 2.0
NOISE_RULE = (
    f"a gain counts only beyond {NOISE_SIGMAS:g} binomial standard errors of the difference of two top-1s "
    "on the test set, sqrt(p_a (1 - p_a) / n + p_b (1 - p_b) / n)"
)
Reading = Literal["gain", "loss", "within noise"]


def top1_standard_error(top1_pct: float, test_images: int) -> float:
    """Binomial standard error, in points, of a top-1 of ``top1_pct`` % measured on ``test_images``.

    Raises ValueError for a non-positive count or a percentage outside [0, 100].
    """
    if test_images <= 0:
        raise ValueError(f"test_images: expected a positive count, got {test_images}")
    if not 0.0 <= top1_pct <= 100.0:
        raise ValueError(f"top1_pct: expected a percentage in [0, 100], got {top1_pct}")
    p = top1_pct / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / test_images)


def gain_noise(baseline_pct: float, other_pct: float, test_images: int) -> float:
    """Half-width, in points, of the band within which ``other - baseline`` is test-set noise."""
    se = math.hypot(
        top1_standard_error(baseline_pct, test_images), top1_standard_error(other_pct, test_images)
    )
    return NOISE_SIGMAS * se


def reading(gain_points: float, baseline_pct: float, other_pct: float, test_images: int) -> Reading:
    """ "gain" or "loss" when ``gain_points`` lies outside the noise band, else "within noise"."""
    if abs(gain_points) <= gain_noise(baseline_pct, other_pct, test_images):
        return "within noise"
    return "gain" if gain_points > 0 else "loss"
