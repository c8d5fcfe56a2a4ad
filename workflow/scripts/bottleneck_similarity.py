"""Rule bottleneck_similarity: similarity of every layer to the bottleneck layer, for every
head, beside its row-space-conditional null."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import pandas as pd

    from weight_geometry.hybrid import to_model_layers, to_positions
    from weight_geometry.results_io import load_array, read_json
    from weight_geometry.rowspace_nulls import one_head_null
    from weight_geometry.statistics import bottleneck_table

    inp = snakemake.input
    model, overlaps, k = read_json(inp.model), load_array(inp.overlaps), int(snakemake.wildcards.k)
    sims = dict(enumerate(load_array(inp.same_index)))        # every head
    nulls = {head: one_head_null(overlaps, k, model, head)
             for head in sims}
    choice = snakemake.params.bottleneck  # a model layer: its position among attention layers
    if choice != "auto":
        choice = int(to_positions(pd.DataFrame({"layer": [choice]}), model)["layer"].iloc[0])
    table = bottleneck_table(sims, to_positions(pd.read_parquet(inp.weight_ranks), model),
                             choice, nulls)
    to_model_layers(table, model).to_parquet(snakemake.output[0], index=False)


run_rule(main, snakemake.log[0], snakemake.output)
