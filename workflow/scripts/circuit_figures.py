"""Rule circuit_figures: the Circuits section's figures for one (model, k)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import pandas as pd

    from weight_geometry.circuit_figures import draw_circuits, null_means
    from weight_geometry.figure_names import CIRCUIT_FIGURES
    from weight_geometry.head_layout import head_dims
    from weight_geometry.hybrid import to_positions
    from weight_geometry.results_io import load_array, read_json

    inputs = snakemake.input
    model = read_json(inputs.model)
    scores = {t: load_array(inputs[f"composition_{t}"]) for t in "qkv"}
    null = null_means(pd.read_parquet(inputs.null), head_dims(model))
    draw_circuits(scores, null, to_positions(pd.read_parquet(inputs.layers), model),
                  to_positions(pd.read_parquet(inputs.read_write), model), model["n_heads"],
                  {name: snakemake.output[name] for name in CIRCUIT_FIGURES})


run_rule(main, snakemake.log[0], snakemake.output)
