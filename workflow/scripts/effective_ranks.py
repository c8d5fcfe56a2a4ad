"""Rule effective_ranks: weight ranks (joined per layer range, or the user's CSV); kernel
effective rank per (layer, head)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.hybrid import to_model_layers
    from weight_geometry.ranks import kernel_rank_table
    from weight_geometry.results_io import load_layers, model_dims, read_json
    from weight_geometry.user_ranks import record_moe, record_not_stored, write_effective_ranks

    inp, out = snakemake.input, snakemake.output
    model = read_json(inp.model)
    write_effective_ranks(inp.user_ranks, inp.weight_ranks, model_dims(model),
                          tuple(model["weight_types"]), out.csv, out.parquet,
                          record_moe(model), record_not_stored(model))
    kernel = kernel_rank_table(load_layers(inp.singular_values), model["d_model"])
    to_model_layers(kernel, model).to_parquet(out.kernel, index=False)


run_rule(main, snakemake.log[0], snakemake.output)
