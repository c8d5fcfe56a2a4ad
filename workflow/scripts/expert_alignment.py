"""Rule expert_alignment: FFN-attention alignment of every expert and router row at this k."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.expert_alignment import expert_alignment_table, record_units
    from weight_geometry.hybrid import to_model_layers
    from weight_geometry.results_io import load_layers, read_json

    inp = snakemake.input
    model, k = read_json(inp.model), int(snakemake.wildcards.k)
    table = expert_alignment_table(load_layers(inp.energy, lambda a: a[..., :k]),
                                   load_layers(inp.norm2), load_layers(inp.singular_values),
                                   load_layers(inp.rowspace_eigenvalues), record_units(model),
                                   k, model, model["ffn_input"])
    to_model_layers(table, model).to_parquet(snakemake.output[0], index=False)


run_rule(main, snakemake.log[0], snakemake.output)
