"""Rule effective_ranks: weight ranks (joined per layer range, or the user's CSV); kernel
effective rank per (layer, head)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import pandas as pd

    from weight_geometry.ranks import kernel_rank_table
    from weight_geometry.results_io import load_layers, model_dims, read_json
    from weight_geometry.user_ranks import read_user_ranks

    inp, out = snakemake.input, snakemake.output
    model = read_json(inp.model)
    if inp.user_ranks:
        ranks = read_user_ranks(inp.user_ranks, model_dims(model), tuple(model["weight_types"]))
        ranks["source"] = f"user CSV {inp.user_ranks}"
    else:
        ranks = pd.concat([pd.read_parquet(p) for p in sorted(inp.weight_ranks)],
                          ignore_index=True)
        ranks["source"] = "computed from the weights"
    ranks.drop(columns="source").to_csv(out.csv, index=False)  # the notebook's CSV format
    ranks.to_parquet(out.parquet, index=False)
    kernel = kernel_rank_table(load_layers(inp.singular_values), model["d_model"])
    kernel.to_parquet(out.kernel, index=False)


run_rule(main, snakemake.log[0], snakemake.output)
