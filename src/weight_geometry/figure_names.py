"""The figures the workflow writes, by name, and the report section each belongs to.

The Snakefile reads these names at parse time, on every Snakemake start and in every cluster
job, so this module imports nothing; the drawing modules (:mod:`figures`, :mod:`compare`)
import pandas and matplotlib, which would add about half a second to each start.
"""

#: Per (model, k) figure name -> the report section (Snakemake report subcategory).
FIGURES = {
    "similarity_heatmap": "Experiment 1: subspace overlap",
    "best_match": "Head matching",
    "bottleneck_trace": "Experiment 2: bottleneck",
    "alignment": "Experiment 3: FFN alignment",
    "multihead_summary": "Multi-head robustness",
    "effective_ranks": "Effective ranks",
    "kernel_effective_ranks": "Effective ranks",
}

#: With ``circuits: true``, the circuit figures of each (model, k) (rule circuit_figures),
#: all in the report's Circuits section.
CIRCUIT_FIGURES = ("composition_layers", "composition_heads", "read_write")

#: The comparison figures (``results/compare/k{k}/figures/{name}.png``); each name is the
#: column of :func:`compare.compare_table` it plots.
COMPARE_FIGURES = ("adjacent_conditional_ratio", "bottleneck_similarity",
                   "alignment_conditional_ratio", "mean_normalized_eff_rank")
