"""Rule read_write: at k, the overlap of each head's write subspace with every later head's read
subspaces, per layer pair, beside its nulls (see read_write.py)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import torch

    from weight_geometry.hybrid import relabel_table_file
    from weight_geometry.read_write import load_sides, write_read_write
    from weight_geometry.results_io import read_json

    torch.set_num_threads(max(snakemake.threads, 1))
    model = read_json(snakemake.input.model)
    sides = load_sides(snakemake.input, model)
    write_read_write(sides, int(snakemake.wildcards.k), snakemake.output[0])
    relabel_table_file(snakemake.output[0], model)  # a hybrid's table names model layers


run_rule(main, snakemake.log[0], snakemake.output)
