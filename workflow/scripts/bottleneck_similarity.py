"""Rule bottleneck_similarity: similarity of every layer to the bottleneck layer, per head."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import pandas as pd

    from weight_geometry.results_io import load_similarities
    from weight_geometry.statistics import bottleneck_table

    table = bottleneck_table(
        load_similarities(snakemake.input.similarity),
        pd.read_parquet(snakemake.input.weight_ranks),
        snakemake.params.bottleneck,
    )
    table.to_parquet(snakemake.output[0], index=False)


run_rule(main, snakemake.log[0], snakemake.output)
