"""Rule composition: Q-, K- and V-composition of every ordered pair of heads, beside the null of
isotropic random weights (k-independent; see composition.py)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import torch

    from weight_geometry.composition import load_circuits, write_composition
    from weight_geometry.hybrid import relabel_table_file
    from weight_geometry.results_io import read_json

    torch.set_num_threads(max(snakemake.threads, 1))
    model, out = read_json(snakemake.input.model), snakemake.output
    write_composition(load_circuits(snakemake.input, model), out)
    for table in (out.top, out.layers):  # a hybrid's tables name model layers
        relabel_table_file(table, model)


run_rule(main, snakemake.log[0], snakemake.output)
