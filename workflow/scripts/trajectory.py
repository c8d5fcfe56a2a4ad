"""Rule trajectory: a checkpoint series' per-layer statistics and drift over the steps, with
its figures and report (the first checkpoint as the empirical null)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import numpy as np
    import pandas as pd

    from weight_geometry.hybrid import to_model_layers
    from weight_geometry.results_io import load_layers, read_json
    from weight_geometry.series import TRAJECTORY_FIGURES
    from weight_geometry.trajectory import (
        draw_figures,
        drift_table,
        report_markdown,
        trajectory_table,
    )

    inp, out, params = snakemake.input, snakemake.output, snakemake.params
    steps, k = list(params.steps), int(snakemake.wildcards.k)
    bounds = np.cumsum([0, *params.n_chunks])

    def load_bases(i):
        vectors = inp.vectors[bounds[i]:bounds[i + 1]]
        return load_layers(vectors, lambda a: a[:, :, :k, :])

    table = trajectory_table(steps, [pd.read_parquet(p) for p in inp.layers])
    table.to_parquet(out.trajectory_table, index=False)
    drift = to_model_layers(drift_table(steps, load_bases), read_json(inp.models[-1]))
    drift.to_parquet(out.drift_table, index=False)
    d_model = read_json(inp.models[-1])["d_model"]
    draw_figures(table, drift, {name: out[name] for name in TRAJECTORY_FIGURES}, k / d_model)
    with open(out.report, "w") as f:
        f.write(report_markdown(snakemake.wildcards.series, k, table, drift))


run_rule(main, snakemake.log[0], snakemake.output)
