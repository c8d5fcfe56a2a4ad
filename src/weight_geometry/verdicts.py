"""The report's verdicts: one sentence per experiment from its statistics (:mod:`statistics`),
with the notebook's thresholds (SCIENCE.md) and a caveat where a trend could be chance.

Pure text from numbers: no arrays, cost O(1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the verdicts need neither numpy nor pandas
    from .statistics import Correlation


def overlap_verdict(summary: dict[str, float]) -> str:
    """Experiment 1 verdict with the notebook's rules."""
    gap, mean = summary["adjacent_minus_distant"], summary["off_diagonal_mean"]
    if gap > 0.05:
        return (f"Adjacent layers share more subspace ({summary['adjacent_mean']:.3f}) than"
                f" distant layers ({summary['distant_mean']:.3f}): phase structure, nearby layers"
                " refine similar subspaces while distant layers target different geometry.")
    if mean > 0.7:
        return (f"High uniform similarity across layers (mean {mean:.3f}): depth may be partly"
                " redundant, layers query similar subspaces.")
    return (f"Moderate similarity (off-diagonal mean {mean:.3f}): layers share some subspace but"
            " also target distinct directions.")


#: Permutation p-value above which a trend that a verdict rests on is called possibly chance.
SIGNIFICANCE = 0.05


def _chance_caveat(**trends: Correlation) -> str:
    """The verdict's caveat for the trends it rests on whose Pearson permutation p-value is
    above :data:`SIGNIFICANCE` (the notebook's rule reads r alone; few layers give large r
    by chance)."""
    weak = [f"{name} p={c.pearson_p:.3g}" for name, c in trends.items()
            if c.pearson_p > SIGNIFICANCE]
    if not weak:
        return ""
    return (f" Caveat: {' and '.join(weak)} > {SIGNIFICANCE}: the trend it rests on could be"
            f" chance.")


def bottleneck_verdict(bottleneck: int, pre: Correlation, post: Correlation,
                       chosen_by_rank: bool = True) -> str:
    """Experiment 2 verdict: convergence if pre r > 0.3 and post r < -0.3; partial if pre only
    (or if pre and the post trend is undefined, which the verdict then says); either with a
    caveat where a trend it rests on has a permutation p-value above :data:`SIGNIFICANCE`."""
    trends = f"pre {pre.text()}; post {post.text()}"
    if not pre.defined:
        return (f"Undetermined: too few layers before layer {bottleneck} for a trend ({trends}).")
    if pre.pearson > 0.3 and post.defined and post.pearson < -0.3:
        return (f"Layer {bottleneck} is a convergence point: similarity rises towards it from"
                f" both sides ({trends}).{_chance_caveat(pre=pre, post=post)}")
    if pre.pearson > 0.3:
        late = " but not from late layers" if post.defined else \
            "; too few layers follow it for a late trend"
        return (f"Partial convergence: similarity rises towards layer {bottleneck} from early"
                f" layers{late} ({trends}).{_chance_caveat(pre=pre)}")
    anomaly = ("; its low rank may be a local anomaly rather than a convergence point"
               if chosen_by_rank else "")
    return f"No clear convergence towards layer {bottleneck} ({trends}){anomaly}."


def alignment_verdict(mean_ratio: float, ffn_input: str) -> str:
    """Experiment 3 verdict: ratio to chance > 1.5 coupled, < 0.7 avoids, else near chance."""
    if mean_ratio > 1.5:
        return (f"The FFN input ({ffn_input}) is coupled with attention ({mean_ratio:.2f}x"
                " chance): they operate in overlapping subspaces.")
    if mean_ratio < 0.7:
        return (f"The FFN input ({ffn_input}) avoids the attention subspace ({mean_ratio:.2f}x"
                " chance): attention routes in one subspace, the FFN reads its complement.")
    return (f"FFN alignment is near chance ({mean_ratio:.2f}x): no strong coupling or avoidance.")
