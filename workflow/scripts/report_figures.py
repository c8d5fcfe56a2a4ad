"""Rule report_figures: the report's figures for one (model, k)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.figure_names import FIGURES
    from weight_geometry.figures import draw_all
    from weight_geometry.results_io import load_analysis

    p = snakemake.params
    analysis = load_analysis(snakemake.input, int(snakemake.wildcards.k), p.heads, p.primary_head)
    draw_all(analysis, {name: snakemake.output[name] for name in FIGURES})


run_rule(main, snakemake.log[0], snakemake.output)
