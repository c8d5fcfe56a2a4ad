"""Rule rowspace_overlap: how much the KV row spaces of every two layers overlap (k-independent),
the moments behind the row-space-conditional null of similarity."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.results_io import load_row_spaces, read_json, save_result
    from weight_geometry.rowspace_nulls import rowspace_overlaps

    model = read_json(snakemake.input.model)
    bases = load_row_spaces(snakemake.input.vectors, model)
    save_result(snakemake.output[0], rowspace_overlaps(bases))


run_rule(main, snakemake.log[0], snakemake.output)
