"""Rule report_markdown: the markdown report of one (model, k), the same as one self-contained
HTML page, and the interactive similarity heatmap."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from pathlib import Path

    from weight_geometry.circuits_report import load_circuit_tables
    from weight_geometry.figure_names import FIGURES
    from weight_geometry.interactive import chart_page, report_page, similarity_chart
    from weight_geometry.report import render
    from weight_geometry.results_io import load_analysis

    p, out = snakemake.params, snakemake.output
    analysis = load_analysis(snakemake.input, int(snakemake.wildcards.k), p.heads, p.primary_head)
    text = render(analysis, load_circuit_tables(snakemake.input))
    Path(out.markdown).write_text(text)
    bundle = Path(p.vega).read_text()
    images = {f"figures/{name}.png": Path(path)
              for name, path in zip(FIGURES, snakemake.input.figures, strict=True)}
    images["../figures/ksweep.png"] = Path(snakemake.input.ksweep_figure)
    images.update({f"figures/{Path(path).name}": Path(path)
                   for path in snakemake.input.circuit_figures})
    chart = similarity_chart(analysis)
    Path(out.html).write_text(report_page(analysis, text, images, bundle, chart))
    Path(out.interactive).write_text(chart_page(analysis, bundle, chart))


run_rule(main, snakemake.log[0], snakemake.output)
