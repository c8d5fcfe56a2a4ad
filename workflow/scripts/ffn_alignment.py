"""Rule ffn_alignment: FFN-attention alignment of every head at this k, with both nulls."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.alignment import alignment_table
    from weight_geometry.hybrid import to_model_layers
    from weight_geometry.results_io import load_layers, read_json

    inp = snakemake.input
    model = read_json(inp.model)
    table = alignment_table(load_layers(inp.energy), load_layers(inp.norm2),
                            load_layers(inp.ffn_singular_values),
                            load_layers(inp.rowspace_eigenvalues), int(snakemake.wildcards.k),
                            model, model["ffn_input"])
    to_model_layers(table, model).to_parquet(snakemake.output[0], index=False)


run_rule(main, snakemake.log[0], snakemake.output)
