"""Rule compare_models: every configured model side by side on normalized depth, at this k."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from pathlib import Path

    import pandas as pd

    from weight_geometry.compare import (
        COMPARE_FIGURES,
        compare_summary,
        compare_table,
        draw_compare,
        render_compare,
    )
    from weight_geometry.results_io import read_json

    inp, out, k = snakemake.input, snakemake.output, int(snakemake.wildcards.k)
    models = {}
    for model_path, layers_path in zip(inp.models, inp.layers, strict=True):
        record = read_json(model_path)
        models[record["name"]] = (record, pd.read_parquet(layers_path))
    table = compare_table(models, k)
    summary = compare_summary(table)
    table.to_parquet(out.table, index=False)
    table.to_csv(out.csv, index=False)
    summary.to_csv(out.summary, index=False)
    draw_compare(table, {name: out[name] for name in COMPARE_FIGURES})
    records = {name: record for name, (record, _) in models.items()}
    Path(out.report).write_text(render_compare(table, summary, k, records))


run_rule(main, snakemake.log[0], snakemake.output)
