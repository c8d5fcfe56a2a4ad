"""Rule k_sweep: similarity and alignment statistics for every k below the smallest head size,
one extraction."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import run_rule


def main():
    from weight_geometry.figures import draw_ksweep
    from weight_geometry.head_layout import is_uniform, min_head_dim
    from weight_geometry.ksweep import ksweep_table
    from weight_geometry.results_io import load_array, load_layers, read_json

    inp, out, heads = snakemake.input, snakemake.output, snakemake.params.heads
    model = read_json(inp.model)

    def sampled(a):  # only the sampled heads' bytes are read from each memmap
        return a[:, heads]

    table = ksweep_table(load_layers(inp.vectors, sampled), load_layers(inp.energy, sampled),
                         load_layers(inp.norm2), load_layers(inp.singular_values, sampled),
                         model, heads, load_array(inp.overlaps),
                         load_layers(inp.rowspace_eigenvalues))
    table.to_parquet(out.parquet, index=False)
    table.to_csv(out.csv, index=False)
    draw_ksweep(table, min_head_dim(model), out.figure, is_uniform(model))


run_rule(main, snakemake.log[0], snakemake.output)
