"""The verdicts' thresholds, from the notebook and SCIENCE.md, on each side of each boundary."""

from __future__ import annotations

import pytest

from weight_geometry.statistics import Correlation
from weight_geometry.verdicts import alignment_verdict, bottleneck_verdict, overlap_verdict


@pytest.mark.parametrize("gap,mean,phrase", [
    (0.051, 0.9, "phase structure"),             # adjacent - distant > 0.05 comes first
    (0.05, 0.71, "High uniform similarity across layers (mean 0.710)"),
    (0.05, 0.7, "Moderate similarity (off-diagonal mean 0.700)"),
    (-0.2, 0.1, "Moderate similarity (off-diagonal mean 0.100)"),
])
def test_overlap_verdict_thresholds(gap, mean, phrase):
    summary = {"adjacent_minus_distant": gap, "off_diagonal_mean": mean,
               "adjacent_mean": 0.5 + gap, "distant_mean": 0.5}
    assert phrase in overlap_verdict(summary)


def _r(pearson: float, n: int = 10) -> Correlation:
    return Correlation(n, pearson, pearson, 0.01, 0.01)


@pytest.mark.parametrize("pre,post,phrase", [
    (_r(0.31), _r(-0.31), "Layer 7 is a convergence point"),
    (_r(0.31), _r(-0.3), "Partial convergence: similarity rises towards layer 7"),
    (_r(0.31), _r(float("nan"), n=2), "from early layers; too few layers follow it for a"
                                      " late trend (pre"),
    (_r(0.3), _r(-0.9), "No clear convergence towards layer 7"),
    (_r(float("nan"), n=2), _r(-0.9), "Undetermined: too few layers before layer 7"),
])
def test_bottleneck_verdict_thresholds(pre, post, phrase):
    verdict = bottleneck_verdict(7, pre, post)
    assert phrase in verdict
    # an undefined trend is not called absent
    assert ("not from late layers" in verdict) == (post.defined and "Partial" in verdict)


def test_bottleneck_verdict_flags_a_trend_that_could_be_chance():
    """A verdict resting on a trend with permutation p > 0.05 says so and names it; trends
    it does not rest on (the post trend of a partial verdict) are not named."""
    strong, weak = _r(0.9), Correlation(4, 0.8, 0.8, 0.2, 0.21)
    assert "Caveat" not in bottleneck_verdict(7, strong, _r(-0.9))
    assert "Caveat: pre p=0.21 > 0.05" in bottleneck_verdict(7, weak, _r(-0.9))
    both = bottleneck_verdict(7, weak, Correlation(4, -0.8, -0.8, 0.2, 0.3))
    assert both.startswith("Layer 7 is a convergence point") and "pre p=0.21 and post p=0.3" in both
    partial = bottleneck_verdict(7, strong, Correlation(4, 0.1, 0.1, 0.9, 0.9))
    assert partial.startswith("Partial") and "Caveat" not in partial


def test_bottleneck_verdict_speaks_of_low_rank_only_for_a_rank_chosen_layer():
    pre, post = _r(0.1), _r(-0.9)
    assert "its low rank may be a local anomaly" in bottleneck_verdict(7, pre, post)
    configured = bottleneck_verdict(7, pre, post, chosen_by_rank=False)
    assert "rank" not in configured and configured.startswith("No clear convergence")


@pytest.mark.parametrize("ratio,phrase", [
    (1.51, "The FFN input (W_up) is coupled with attention (1.51x chance)"),
    (1.5, "FFN alignment is near chance (1.50x)"),
    (0.7, "FFN alignment is near chance (0.70x)"),
    (0.69, "The FFN input (W_up) avoids the attention subspace (0.69x chance)"),
])
def test_alignment_verdict_thresholds(ratio, phrase):
    assert phrase in alignment_verdict(ratio, "W_up")
