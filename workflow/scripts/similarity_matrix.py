"""Rule similarity_matrix: L x L Grassmann similarity of one head's top-k subspaces over layers."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.results_io import load_head_bases, save_result
    from weight_geometry.similarity import similarity_matrix

    w = snakemake.wildcards
    bases = load_head_bases(snakemake.input.vectors, int(w.head), int(w.k))
    save_result(snakemake.output[0], similarity_matrix(bases))


run_rule(main, snakemake.log[0], snakemake.output)
