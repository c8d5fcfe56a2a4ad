"""Rule layer_table: the per-layer cross-reference of effective ranks and subspace metrics."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import pandas as pd

    from weight_geometry.crossref import layer_table
    from weight_geometry.hybrid import to_model_layers, to_positions
    from weight_geometry.layer_kinds import with_layer_type
    from weight_geometry.results_io import load_array, load_layers, read_json

    inp = snakemake.input
    model = read_json(inp.model)

    def positions(path):  # a hybrid's tables, indexed as its arrays are
        return to_positions(pd.read_parquet(path), model)

    table = layer_table(positions(inp.weight_ranks), load_array(inp.similarity[0]),
                        load_array(inp.best_match), positions(inp.bottleneck),
                        positions(inp.alignment), load_layers(inp.singular_values),
                        snakemake.params.head, int(snakemake.wildcards.k),
                        model, load_array(inp.overlaps))
    table = with_layer_type(to_model_layers(table, model), model)
    table.to_parquet(snakemake.output.parquet, index=False)
    table.to_csv(snakemake.output.csv, index=False)


run_rule(main, snakemake.log[0], snakemake.output)
