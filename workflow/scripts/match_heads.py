"""Rule match_heads: best-match similarity between layers over all heads, with its nulls, and
Experiment 1's adjacent-layer similarity for every head."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.head_matching import match_heads, same_index_matrices
    from weight_geometry.head_summary import adjacent_by_head, within_layer_similarity
    from weight_geometry.hybrid import to_model_layers
    from weight_geometry.layer_kinds import with_layer_type
    from weight_geometry.results_io import load_array, load_layers, read_json, save_result

    k, inp, out = int(snakemake.wildcards.k), snakemake.input, snakemake.output
    model = read_json(inp.model)
    overlaps = load_array(inp.overlaps)
    matrix, pairs, table, sims = match_heads(
        load_layers(inp.vectors, lambda a: a[:, :, :k]), k, model, overlaps)
    save_result(out.best_match, matrix)
    save_result(out.pairs, pairs)
    save_result(out.same_index, same_index_matrices(sims))
    table = to_model_layers(table, model)
    table.to_parquet(out.table, index=False)
    table.to_csv(out.csv, index=False)

    def labelled(t):  # model layers, with their kind
        return with_layer_type(to_model_layers(t, model), model)

    labelled(adjacent_by_head(sims, overlaps, k, model)).to_parquet(
        out.heads, index=False)
    labelled(within_layer_similarity(sims, overlaps, k, model)).to_parquet(
        out.within_layer, index=False)


run_rule(main, snakemake.log[0], snakemake.output)
