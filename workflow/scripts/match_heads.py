"""Rule match_heads: best-match similarity between layers over all heads, with its nulls."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.head_matching import match_heads
    from weight_geometry.results_io import load_layers, read_json, save_result

    k, out = int(snakemake.wildcards.k), snakemake.output
    model = read_json(snakemake.input.model)
    matrix, pairs, table = match_heads(
        load_layers(snakemake.input.vectors, lambda a: a[:, :, :k]), k, model["d_model"],
        model["n_kv_heads"], model["d_head"])
    save_result(out.best_match, matrix)
    save_result(out.pairs, pairs)
    table.to_parquet(out.table, index=False)
    table.to_csv(out.csv, index=False)


run_rule(main, snakemake.log[0], snakemake.output)
