"""Rule match_heads: best-match similarity between layers over all heads, with its nulls."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.head_matching import best_match, cross_head_similarity, layer_pair_table
    from weight_geometry.results_io import load_layers, read_json, save_result

    k, out = int(snakemake.wildcards.k), snakemake.output
    cross = cross_head_similarity(load_layers(snakemake.input.vectors, lambda a: a[:, :, :k]))
    matrix, pairs = best_match(cross)
    save_result(out.best_match, matrix)
    save_result(out.pairs, pairs)
    model = read_json(snakemake.input.model)
    table = layer_pair_table(cross, k, model["d_model"], model["n_kv_heads"], model["d_head"])
    table.to_parquet(out.table, index=False)
    table.to_csv(out.csv, index=False)


run_rule(main, snakemake.log[0], snakemake.output)
