"""Rule extract_layers: one pass over a layer range, every tensor read once (see extraction.py)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.checkpoint import open_checkpoint
    from weight_geometry.extraction import run_extraction_job
    from weight_geometry.ranks import EXPERT_RANK_COLUMNS, RANK_COLUMNS
    from weight_geometry.results_io import BASES_FILES, write_rows

    params, out = snakemake.params, snakemake.output
    ckpt = open_checkpoint(params.path, params.fold_norms)
    layers = range(int(snakemake.wildcards.first), int(snakemake.wildcards.last) + 1)
    rows = run_extraction_job(ckpt, layers, params.device, snakemake.threads, params.fold_norms,
                              {name: out[name] for name in BASES_FILES}, params.compute_ranks)
    columns = RANK_COLUMNS if ckpt.moe is None else EXPERT_RANK_COLUMNS  # expert: 5th field
    write_rows(out.weight_ranks, columns, [(*row, None)[:len(columns)] for row in rows])


run_rule(main, snakemake.log[0], snakemake.output)
