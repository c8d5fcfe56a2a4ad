"""Rule extract_layers: one pass over a layer range, every tensor read once (see extraction.py)."""

import _library  # noqa: F401  (puts the checkout's src/ on sys.path)

from weight_geometry.rule_script import progress, run_rule


def main():
    import torch

    from weight_geometry.checkpoint import open_checkpoint
    from weight_geometry.extraction import RANK_COLUMNS, layer_workers, write_layers
    from weight_geometry.kernels import resolve_device
    from weight_geometry.results_io import BASES_FILES, write_rows

    threads = max(snakemake.threads, 1)  # --set-threads extract_layers=0 gives 0
    torch.set_num_threads(threads)
    device = resolve_device(snakemake.params.device)
    workers = layer_workers(device, threads)
    fold = snakemake.params.fold_norms
    ckpt = open_checkpoint(snakemake.params.path, fold)
    layers = range(int(snakemake.wildcards.first), int(snakemake.wildcards.last) + 1)
    progress(f"{ckpt.path}: layers {layers.start}-{layers.stop - 1} on {device}"
             f" ({workers} at a time)")
    out = snakemake.output
    rows = write_layers(ckpt, layers, device, fold, {name: out[name] for name in BASES_FILES},
                        snakemake.params.compute_ranks, workers)
    write_rows(out.weight_ranks, RANK_COLUMNS, rows)


run_rule(main, snakemake.log[0], snakemake.output)
