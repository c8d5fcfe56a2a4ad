"""Rule alignment: FFN-attention alignment of every head at this k."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.alignment import alignment_table
from weight_geometry.results_io import load_layers, read_json
from weight_geometry.rule_script import run_rule


def main():
    model = read_json(snakemake.input.model)
    table = alignment_table(load_layers(snakemake.input.energy),
                            load_layers(snakemake.input.norm2), int(snakemake.wildcards.k),
                            model["d_model"], model["ffn_input"])
    table.to_parquet(snakemake.output[0], index=False)


run_rule(main, snakemake.log[0], snakemake.output)
