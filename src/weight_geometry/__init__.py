"""Weight-space geometry of transformer language models.

The library behind the Snakemake workflow: read checkpoints lazily (one tensor at a time),
extract per-head attention subspaces from the factored kernel, and compute Grassmann
similarities, FFN alignment, effective ranks, statistics, figures and the report.
"""

__version__ = "0.1.0"
