"""The report's verdicts: one sentence per finding from its statistics, each naming its null and
its test, and saying nothing the statistic does not test.

Two kinds stand side by side. The notebook's verdicts keep its thresholds (SCIENCE.md) on
absolute similarities and on the ratio to the isotropic chance ``k/d``; the conditional
verdicts judge the same quantities against the row-space-conditional null (random k-subspaces
of each head's own KV row space, :mod:`rowspace_nulls`) with z-tests whose p-values are
Benjamini-Hochberg adjusted over their family (:mod:`multiplicity`).

Pure text from numbers: no arrays, cost O(1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .multiplicity import FDR_Q

if TYPE_CHECKING:  # annotations only
    from .multiplicity import FamilyCounts
    from .statistics import Correlation

#: How the conditional verdicts name their null.
CONDITIONAL_NULL = ("the row-space-conditional null (random k-subspaces of each head's own KV"
                    " row space)")


#: The words every section's finding uses when nothing in it departs from its nulls.
AT_CHANCE = "indistinguishable from chance"


def _times(value: float, chance: float | None) -> str:
    """``", 1.54x chance k/d"`` (empty without a chance level)."""
    return f", {value / chance:.2f}x chance k/d" if chance else ""


def overlap_verdict(summary: dict[str, float], chance: float | None = None,
                    as_chance: bool = False) -> str:
    """Experiment 1 verdict with the notebook's rules on absolute similarities, each similarity
    also as a multiple of the isotropic chance ``k/d`` (``chance``); ``as_chance``: no layer
    pair is significantly above the conditional null, so the verdict says the numbers it rests
    on read as chance."""
    gap, mean = summary["adjacent_minus_distant"], summary["off_diagonal_mean"]
    rule = "notebook's rule on absolute similarities"
    if gap > 0.05:
        text = (f"Adjacent layers share more subspace ({summary['adjacent_mean']:.3f}"
                f"{_times(summary['adjacent_mean'], chance)}) than distant layers"
                f" ({summary['distant_mean']:.3f}{_times(summary['distant_mean'], chance)};"
                f" gap {gap:.3f} > 0.05, {rule}).")
    elif mean > 0.7:
        text = (f"High uniform similarity across layers (off-diagonal mean {mean:.3f} > 0.7"
                f"{_times(mean, chance)}, {rule}): layers query similar subspaces.")
    else:
        text = (f"No phase structure by the {rule} (adjacent minus distant {gap:.3f} <= 0.05,"
                f" off-diagonal mean {mean:.3f} <= 0.7{_times(mean, chance)}).")
    if as_chance:
        text += (f" Against {CONDITIONAL_NULL}, adjacent and distant similarity are both"
                 f" {AT_CHANCE}: this reads as chance.")
    return text


def conditional_overlap_verdict(adjacent: FamilyCounts, distant_ratio: float) -> str:
    """Experiment 1 against the conditional null: adjacent-layer similarity of the primary head
    (one-sided z-tests, one per adjacent pair)."""
    test = f"one-sided z-test per adjacent pair, {adjacent.count('pairs')}"
    if adjacent.n_above == 0:
        return (f"Adjacent-layer similarity is indistinguishable from {CONDITIONAL_NULL}"
                f" (mean {adjacent.mean_ratio:.2f}x its mean; {test}): adjacent layers share"
                " no more than the overlap of their row spaces gives.")
    return (f"Adjacent layers share more than {CONDITIONAL_NULL} (mean"
            f" {adjacent.mean_ratio:.2f}x its mean; {test}); distant layers"
            f" {distant_ratio:.2f}x.")


def identity_verdict(n_pairs: int, persistent: list[tuple[int, int]]) -> str:
    """Head identities: same-index against random head orderings (permutation test per layer
    pair, BH over the pairs)."""
    test = (f"permutation test over head orderings per layer pair, BH q = {FDR_Q} over"
            f" {n_pairs} pairs")
    if not persistent:
        return f"No evidence that head identities persist across layers ({test})."
    listed = ", ".join(f"{a}-{b}" for a, b in persistent[:10])
    more = f" and {len(persistent) - 10} more" if len(persistent) > 10 else ""
    return (f"Head identities persist across {len(persistent)} layer pairs ({listed}{more}):"
            f" same-index heads share more than randomly paired heads ({test}).")


#: Permutation p-value above which a trend that a verdict rests on is called possibly chance.
SIGNIFICANCE = FDR_Q


def _chance_caveat(**trends: tuple[Correlation, float]) -> str:
    """The verdict's caveat for the trends it rests on whose BH-adjusted p-value (given beside
    each) is above :data:`SIGNIFICANCE` (the notebook's rule reads r alone; few layers give
    large r by chance)."""
    weak = [f"{name} adjusted p={p:.3g}" for name, (_, p) in trends.items() if p > SIGNIFICANCE]
    if not weak:
        return ""
    return (f" Caveat: {' and '.join(weak)} > {SIGNIFICANCE}: the trend it rests on could be"
            f" chance.")


def no_bottleneck_verdict(choice: str) -> str:
    """Experiment 2 when ``auto`` found no bottleneck."""
    return f"No bottleneck: {choice}; Experiment 2 is not run."


def bottleneck_verdict(bottleneck: int, pre: Correlation, post: Correlation,
                       adjusted: tuple[float, float]) -> str:
    """Experiment 2 verdict with the notebook's rule: convergence if pre r > 0.3 and post r <
    -0.3; partial if pre only (or if pre and the post trend is undefined, which the verdict
    then says); either with a caveat where a trend it rests on has a BH-adjusted permutation
    p-value (``adjusted``: pre, post) above :data:`SIGNIFICANCE`."""
    trends = (f"Pearson r of similarity vs layer index with permutation p: pre {pre.text()};"
              f" post {post.text()}")
    if not pre.defined:
        return (f"Undetermined: too few layers before layer {bottleneck} for a trend ({trends}).")
    if pre.pearson > 0.3 and post.defined and post.pearson < -0.3:
        return (f"Layer {bottleneck} is a convergence point by the notebook's rule: similarity"
                f" rises towards it from both sides ({trends})."
                f"{_chance_caveat(pre=(pre, adjusted[0]), post=(post, adjusted[1]))}")
    if pre.pearson > 0.3:
        late = " but not from late layers" if post.defined else \
            "; too few layers follow it for a late trend"
        return (f"Partial convergence by the notebook's rule: similarity rises towards layer"
                f" {bottleneck} from early layers{late} ({trends})."
                f"{_chance_caveat(pre=(pre, adjusted[0]))}")
    return f"No convergence towards layer {bottleneck} by the notebook's rule ({trends})."


def alignment_verdict(mean_ratio: float, ffn_input: str, mean_z: float | None = None,
                      deviating: list[tuple[int, float]] | None = None) -> str:
    """Experiment 3 verdict with the notebook's thresholds on the ratio to isotropic chance:
    > 1.5 coupled, < 0.7 avoids, else within its near-chance band; "near chance" only where the
    mean isotropic z (``mean_z``) is also near 0 (|z| < 2, the report's guide), and the layers
    whose alignment differs from the conditional null (``deviating``: layer, ratio to it) named."""
    rule = "isotropic chance k/d, notebook's thresholds 1.5 and 0.7"
    named = ""
    if deviating:
        listed = ", ".join(f"{layer} ({ratio:.2f}x)" for layer, ratio in deviating[:8])
        more = f" and {len(deviating) - 8} more" if len(deviating) > 8 else ""
        named = (f" Layers that differ from the conditional null (x its chance): {listed}"
                 f"{more}.")
    if mean_ratio > 1.5:
        return (f"The FFN input ({ffn_input}) is coupled with the attention subspace"
                f" ({mean_ratio:.2f}x {rule}).{named}")
    if mean_ratio < 0.7:
        return (f"The FFN input ({ffn_input}) avoids the attention subspace ({mean_ratio:.2f}x"
                f" {rule}).{named}")
    if mean_z is not None and abs(mean_z) >= 2:
        return (f"FFN alignment lies within the notebook's near-chance band ({mean_ratio:.2f}x"
                f" {rule}) but is not at chance: mean z {mean_z:+.1f} against the isotropic"
                f" null.{named}")
    if mean_z is not None and not deviating:
        return (f"FFN alignment is {AT_CHANCE} ({mean_ratio:.2f}x {rule}; mean z"
                f" {mean_z:+.1f} against the isotropic null).")
    return f"FFN alignment is near chance ({mean_ratio:.2f}x {rule}).{named}"


def conditional_alignment_verdict(tested: FamilyCounts, ffn_input: str, what: str) -> str:
    """Experiment 3 against the conditional null (two-sided z-tests over ``what``, e.g. "(layer,
    head) pairs")."""
    test = f"two-sided z-test each, {tested.count(what)}"
    if tested.n_above == 0 and tested.n_below == 0:
        return (f"No coupling beyond the row space: the FFN input's ({ffn_input}) share in the"
                f" kernels' top-k directions is what {CONDITIONAL_NULL} holds (mean"
                f" {tested.mean_ratio:.2f}x; {test}).")
    if tested.n_above and tested.n_below:
        return (f"Neither coupled nor avoiding as a whole: the FFN input ({ffn_input}) puts more"
                f" of its energy into the kernels' top-k directions than {CONDITIONAL_NULL}"
                f" holds for some, less for others (mean {tested.mean_ratio:.2f}x; {test}).")
    if tested.n_above:
        return (f"Coupled beyond the row space: the FFN input ({ffn_input}) puts more of its"
                f" energy into the kernels' top-k directions than {CONDITIONAL_NULL} holds"
                f" (mean {tested.mean_ratio:.2f}x; {test}).")
    return (f"Avoidance beyond the row space: the FFN input ({ffn_input}) puts less of its"
            f" energy into the kernels' top-k directions than {CONDITIONAL_NULL} holds (mean"
            f" {tested.mean_ratio:.2f}x; {test}).")
