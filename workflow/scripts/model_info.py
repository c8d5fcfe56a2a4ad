"""Rule model_info: record the checkpoint's architecture, dimensions and storage in model.json."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.checkpoint import open_checkpoint
    from weight_geometry.results_io import write_json

    params = snakemake.params
    ckpt = open_checkpoint(params.path, params.fold_norms, configured_source=params.source)
    write_json(snakemake.output[0], {"name": snakemake.wildcards.model,
                                     **ckpt.describe(params.fold_norms)})


run_rule(main, snakemake.log[0], snakemake.output)
