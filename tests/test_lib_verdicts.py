"""The verdicts' thresholds, from the notebook and SCIENCE.md, on each side of each boundary;
the conditional verdicts by their counts of significant tests; every verdict names its null
or rule."""

from __future__ import annotations

import pytest

from weight_geometry.multiplicity import FamilyCounts
from weight_geometry.statistics import Correlation
from weight_geometry.verdicts import (
    alignment_verdict,
    bottleneck_verdict,
    conditional_alignment_verdict,
    conditional_overlap_verdict,
    identity_verdict,
    no_bottleneck_verdict,
    overlap_verdict,
)


@pytest.mark.parametrize("gap,mean,phrase", [
    (0.051, 0.9, "Adjacent layers share more subspace (0.551) than distant layers (0.500;"
                 " gap 0.051 > 0.05"),              # adjacent - distant > 0.05 comes first
    (0.05, 0.71, "High uniform similarity across layers (off-diagonal mean 0.710 > 0.7"),
    (0.05, 0.7, "No phase structure by the notebook's rule"),
    (-0.2, 0.1, "off-diagonal mean 0.100 <= 0.7"),
])
def test_overlap_verdict_thresholds(gap, mean, phrase):
    summary = {"adjacent_minus_distant": gap, "off_diagonal_mean": mean,
               "adjacent_mean": 0.5 + gap, "distant_mean": 0.5}
    verdict = overlap_verdict(summary)
    assert phrase in verdict and "notebook's rule" in verdict
    assert "refine" not in verdict


def _r(pearson: float, n: int = 10) -> Correlation:
    return Correlation(n, pearson, pearson, 0.01, 0.01)


@pytest.mark.parametrize("pre,post,phrase", [
    (_r(0.31), _r(-0.31), "Layer 7 is a convergence point by the notebook's rule"),
    (_r(0.31), _r(-0.3), "Partial convergence by the notebook's rule: similarity rises towards"
                         " layer 7"),
    (_r(0.31), _r(float("nan"), n=2), "from early layers; too few layers follow it for a"
                                      " late trend (Pearson r"),
    (_r(0.3), _r(-0.9), "No convergence towards layer 7 by the notebook's rule"),
    (_r(float("nan"), n=2), _r(-0.9), "Undetermined: too few layers before layer 7"),
])
def test_bottleneck_verdict_thresholds(pre, post, phrase):
    verdict = bottleneck_verdict(7, pre, post, (0.01, 0.01))
    assert phrase in verdict
    # an undefined trend is not called absent
    assert ("not from late layers" in verdict) == (post.defined and "Partial" in verdict)


def test_bottleneck_verdict_flags_a_trend_whose_adjusted_p_could_be_chance():
    """A verdict resting on a trend whose BH-adjusted p is above 0.05 says so and names it;
    trends it does not rest on (the post trend of a partial verdict) are not named."""
    strong = _r(0.9)
    assert "Caveat" not in bottleneck_verdict(7, strong, _r(-0.9), (0.01, 0.02))
    assert "Caveat: pre adjusted p=0.21 > 0.05" in bottleneck_verdict(7, strong, _r(-0.9),
                                                                       (0.21, 0.01))
    both = bottleneck_verdict(7, strong, _r(-0.9), (0.21, 0.3))
    assert both.startswith("Layer 7 is a convergence point") and \
        "pre adjusted p=0.21 and post adjusted p=0.3" in both
    partial = bottleneck_verdict(7, strong, _r(0.1), (0.01, 0.9))
    assert partial.startswith("Partial") and "Caveat" not in partial


def test_no_bottleneck_verdict_says_experiment_2_is_not_run():
    verdict = no_bottleneck_verdict("auto: layer 3 ... does not stand out")
    assert verdict.startswith("No bottleneck: auto: layer 3") and "not run" in verdict


@pytest.mark.parametrize("ratio,phrase", [
    (1.51, "The FFN input (W_up) is coupled with the attention subspace (1.51x isotropic"
           " chance k/d"),
    (1.5, "FFN alignment is near chance (1.50x isotropic chance k/d"),
    (0.7, "FFN alignment is near chance (0.70x"),
    (0.69, "The FFN input (W_up) avoids the attention subspace (0.69x isotropic chance"),
])
def test_alignment_verdict_thresholds(ratio, phrase):
    assert phrase in alignment_verdict(ratio, "W_up")


@pytest.mark.parametrize("above,below,start", [
    (0, 0, "No coupling beyond the row space"),
    (5, 0, "Coupled beyond the row space"),
    (0, 4, "Avoidance beyond the row space"),
    (5, 4, "Neither coupled nor avoiding as a whole"),
])
def test_conditional_alignment_verdict_by_counts(above, below, start):
    verdict = conditional_alignment_verdict(FamilyCounts(90, above, below, 1.02), "W_gate",
                                            "(layer, head) pairs")
    assert verdict.startswith(start)
    assert "row-space-conditional null" in verdict and "two-sided z-test" in verdict
    assert f"{above} of 90 (layer, head) pairs significantly above it" in verdict


def test_conditional_overlap_verdict_names_its_null_and_test():
    none = conditional_overlap_verdict(FamilyCounts(29, 0, 0, 0.99), 1.01)
    assert none.startswith("Adjacent-layer similarity is indistinguishable from the row-space")
    assert "0 of 29 pairs" in none
    some = conditional_overlap_verdict(FamilyCounts(29, 18, 0, 1.82), 1.08)
    assert some.startswith("Adjacent layers share more than the row-space-conditional null")
    assert "1.82x" in some and "distant layers 1.08x" in some and "BH q = 0.05" in some


def test_identity_verdict_only_for_surviving_pairs():
    assert identity_verdict(435, []).startswith("No evidence that head identities persist")
    found = identity_verdict(45, [(2, 5)])
    assert found.startswith("Head identities persist across 1 layer pairs (2-5)")
    assert "permutation test over head orderings" in found and "BH q = 0.05 over 45" in found


def test_overlap_verdict_states_each_similarity_relative_to_chance():
    summary = {"adjacent_minus_distant": 0.076, "off_diagonal_mean": 0.06,
               "adjacent_mean": 0.12, "distant_mean": 0.044}
    verdict = overlap_verdict(summary, chance=0.035)
    assert "(0.120, 3.43x chance k/d)" in verdict and "(0.044, 1.26x chance k/d;" in verdict
    assert "reads as chance" not in verdict
    flat = {"adjacent_minus_distant": -0.001, "off_diagonal_mean": 0.035,
            "adjacent_mean": 0.035, "distant_mean": 0.036}
    at_chance = overlap_verdict(flat, chance=0.035, as_chance=True)
    assert "1.00x chance k/d" in at_chance and "indistinguishable from chance" in at_chance


@pytest.mark.parametrize("z,deviating,phrase", [
    (11.3, [(5, 1.93), (23, 0.64)], "within the notebook's near-chance band (1.14x isotropic"
                                    " chance k/d, notebook's thresholds 1.5 and 0.7) but is not"
                                    " at chance: mean z +11.3"),
    (0.1, [], "FFN alignment is indistinguishable from chance (1.14x"),
    (-0.5, [(3, 0.8)], "FFN alignment is near chance (1.14x"),
])
def test_alignment_verdict_near_chance_agrees_with_z_and_names_layers(z, deviating, phrase):
    verdict = alignment_verdict(1.14, "W_gate", z, deviating)
    assert phrase in verdict
    for layer, ratio in deviating:
        assert f"{layer} ({ratio:.2f}x)" in verdict
