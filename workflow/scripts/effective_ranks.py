"""Rule effective_ranks: join per-range weight ranks; kernel effective rank per (layer, head)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import pandas as pd

    from weight_geometry.ranks import kernel_rank_table
    from weight_geometry.results_io import load_layers, read_json

    ranks = pd.concat([pd.read_parquet(p) for p in sorted(snakemake.input.weight_ranks)],
                      ignore_index=True)
    ranks.to_csv(snakemake.output.csv, index=False)
    ranks.to_parquet(snakemake.output.parquet, index=False)
    kernel = kernel_rank_table(load_layers(snakemake.input.singular_values),
                               read_json(snakemake.input.model)["d_model"])
    kernel.to_parquet(snakemake.output.kernel, index=False)


run_rule(main, snakemake.log[0], snakemake.output)
