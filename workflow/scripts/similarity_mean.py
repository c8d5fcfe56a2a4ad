"""Rule similarity_mean: the similarity matrix averaged over the sampled heads."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    import numpy as np

    from weight_geometry.results_io import load_array, save_result

    save_result(snakemake.output[0], np.mean([load_array(p) for p in snakemake.input], axis=0))


run_rule(main, snakemake.log[0], snakemake.output)
