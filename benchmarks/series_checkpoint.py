"""Time one checkpoint of a series: the whole per-model pipeline on the Qwen2.5-0.5B-shaped
checkpoint (``make_checkpoint.py``), and its extrapolation to a 154-checkpoint Pythia-1B series.

Each checkpoint of a series runs the jobs of one model (extraction, the cheap per-model and
per-k rules, its report), so a series costs the number of checkpoints times one model, plus
one small ``trajectory`` job. The extrapolation scales the measured extraction jobs by the
effective ranks' and subspaces' FLOPs (``benchlib.rank_flops``, which dominate the pass on
the CPU) from the 0.5B shapes to Pythia-1B's (16 layers, d = 2048, d_ff = 8192, 8 heads of
256, no gate), and keeps the other jobs' time (mostly start-up). No GPU figure is measured
here; RESULTS.md records no CPU/GPU ratio to scale by.

    python benchmarks/series_checkpoint.py [--workdir /tmp/wg-bench/series]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import yaml
from benchlib import rank_flops
from make_checkpoint import SHAPES, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
PYTHIA_CHECKPOINTS = 154
PYTHIA_1B = {"n_layers": 16, "weights": [(2048, 2048)] * 4 + [(8192, 2048), (2048, 8192)]}


def model_flops(n_layers: int, weights: list[tuple[int, int]]) -> float:
    return n_layers * sum(rank_flops(w)["gram"] for w in weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wg-bench/series"))
    args = parser.parse_args()
    shape = SHAPES["qwen2.5-0.5b"]
    ckpt = args.workdir / "qwen2.5-0.5b"
    if not (ckpt / "model.safetensors").exists():
        write_checkpoint(ckpt, shape, shape.n_layers)
    run = args.workdir / "run"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "models": {"ckpt": {"source": str(ckpt)}}, "top_k": 20, "device": "cpu"}))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
                    str(run), "--cores", "2", "--resources", "gpu=1", "--configfile",
                    str(run / "config.yaml"), "--quiet"], check=True)
    wall = time.perf_counter() - start
    seconds = {}
    for tsv in (run / "results/ckpt").rglob("benchmarks/*.tsv"):
        with open(tsv) as f:
            seconds[tsv.stem] = float(next(csv.DictReader(f, delimiter="\t"))["s"])
    extract = sum(s for name, s in seconds.items() if name.startswith("extract_layers"))
    ratio = model_flops(PYTHIA_1B["n_layers"], PYTHIA_1B["weights"]) / model_flops(
        shape.n_layers, list(shape.weight_shapes().values()))
    per_1b = wall - extract + extract * ratio
    print(f"qwen2.5-0.5b-shaped checkpoint: {wall:.1f} s wall for one checkpoint (cold, --cores"
          f" 2), of which extraction {extract:.1f} s; jobs: {len(seconds)}")
    print(f"Pythia-1B per checkpoint: extraction FLOPs {ratio:.1f}x, about {per_1b:.0f} s; 154"
          f" checkpoints one after another: {PYTHIA_CHECKPOINTS * per_1b / 3600:.1f} h")


if __name__ == "__main__":
    main()
