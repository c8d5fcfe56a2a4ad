"""Rule report_markdown: the markdown report of one (model, k)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from pathlib import Path

    from weight_geometry.report import render
    from weight_geometry.results_io import load_analysis

    p = snakemake.params
    analysis = load_analysis(snakemake.input, int(snakemake.wildcards.k), p.heads, p.primary_head)
    Path(snakemake.output[0]).write_text(render(analysis))


run_rule(main, snakemake.log[0], snakemake.output)
