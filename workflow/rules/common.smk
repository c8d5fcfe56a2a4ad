# Helpers, config validation, wildcard constraints and target lists (no defs elsewhere).
import re
import sys
from pathlib import Path

from snakemake.utils import validate

# The library of this checkout (rule scripts do the same through workflow/scripts/_library.py).
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from weight_geometry.architectures import GATED
from weight_geometry.config import build_plan, user_models
from weight_geometry.errors import UserError
from weight_geometry.figure_names import CIRCUIT_FIGURES, COMPARE_FIGURES, FIGURES
from weight_geometry.nulls import NULL_LAYERS
from weight_geometry.results_io import (
    BASES_FILES,
    chunk_dir_name,
    unwritable_directory,
)
from weight_geometry.series import TRAJECTORY_FIGURES

try:
    MODELS = user_models(
        config.get("models") or {},
        workflow.overwrite_configfiles,
        workflow.config_settings.config.get("models"),
    )
    PLAN = build_plan(config, MODELS)
except UserError as err:
    sys.stderr.write(f"error: {err}\n")
    sys.exit(1)
config["models"] = MODELS
validate(config, "../schemas/config.schema.yaml")

ENV = "../../envs/geometry.yaml"
R = "results/{model}"
K = "results/{model}/k{k}"
C = "results/compare/k{k}"
T = "results/{series}/trajectory/k{k}"


def one_of(values, width=0):
    """A wildcard constraint matching exactly these values (zero-padded to ``width``): a target
    outside the plan (a k, head or layer range that the config does not ask for, and so was
    never checked) has no rule, instead of a job that fails or writes nonsense."""
    return "|".join(sorted({f"{v:0{width}d}" for v in values})) or "none"


def planned_heads():
    """The head wildcard's constraint: a head with a similarity matrix in this model's plan,
    told apart per model and k by a fixed-width look-behind at the output path before the
    head (``/{model}/k{k}/similarity_head``). A union over the models would let a head of
    model A that model B lacks run a job for B that fails."""
    return (
        "|".join(
            f"(?<=/{re.escape(name)}/k{k}/similarity_head)(?:{one_of(plan.similarity_heads)})"
            for name, plan in PLAN.models.items()
            for k in PLAN.top_k
        )
        or "none"
    )


wildcard_constraints:
    model="|".join(map(re.escape, PLAN.models)) or "no-model",
    k=one_of(PLAN.top_k),
    head=planned_heads(),
    first=one_of((a for m in PLAN.models.values() for a, _ in m.chunks), 3),
    last=one_of((b for m in PLAN.models.values() for _, b in m.chunks), 3),
    series="|".join(map(re.escape, PLAN.series)) or "no-series",


def model_plan(wildcards):
    return PLAN.models[wildcards.model]


def chunk_files(name):
    """Input function: one stored array of every extraction job of the model."""

    def files(wildcards):
        return [
            f"results/{wildcards.model}/bases/{chunk_dir_name(a, b)}/{name}"
            for a, b in model_plan(wildcards).chunks
        ]

    return files


def similarity_files(heads_of):
    def files(wildcards):
        return [
            f"results/{wildcards.model}/k{wildcards.k}/similarity_head{h}.npy"
            for h in heads_of(model_plan(wildcards))
        ]

    return files


def extraction_mem_mb(wildcards, threads):
    """Peak memory of one extraction job, which reads, uses and frees one tensor at a time and
    appends each layer to its outputs. Per worker (one per thread on the CPU): the largest
    weight twice at 4 bytes a value (host and device), the reader's decoding chunk, five d x d
    float64-sized matrices and two layers' outputs (four float32 (h, d_head, d) arrays and
    small ones; finished layers wait to be written in order); plus the interpreter and torch.
    The five bound what one step holds at once: a weight's float32 Gram and eigvalsh's copy
    of it, the float64 Gram and its copy of a weight whose error bound asks for them, and the
    subspaces' float64 factors (three n_kv d_head x d matrices during the key QR; Q_k and the
    energies' T Q_k after it, which read the FFN Gram in ENERGY_BLOCK-row panels, without a
    float64 copy of it). Independent of the number of layers."""
    d = model_plan(wildcards).dims
    largest = max(a * b for a, b in map(d.weight_shape, GATED))
    layer_out = d.n_heads * d.d_head * (4 * d.d_model * 4 + 32) + d.d_model * 8
    per_worker = largest * 8 + 2**24 + 5 * d.d_model**2 * 8 + 2 * layer_out
    return 1500 + threads * per_worker // 2**20


def match_heads_mem_mb(wildcards):
    """For the model's layers, then as many random ones for the null (rows: the larger count
    times h): the top-k vectors of every head in float32, the model's and the null's (the
    model's are held until the job ends); one layer's block of squared cosines against all
    (float64, and the float32 product it is squared from); the (L h)^2 float64 cross-head
    tensor, the null's and the copies the mirroring makes, and the conditional null's mean
    and std of every head pair (with the repeated overlaps they come from); the head-ordering
    permutations' sums, PERMUTATION_CHUNK orderings of L (L + 1) / 2 layer pairs, twice;
    plus the interpreter. Not counted: the pages of the memory-mapped bases, which RSS
    includes while they are mapped (the kernel may map a file in large blocks, beyond the
    top-k rows read) but which are the file's page cache, freed under memory
    pressure."""
    from weight_geometry.multiplicity import PERMUTATION_CHUNK

    d, k = model_plan(wildcards).dims, int(wildcards.k)
    rows = max(d.n_layers, NULL_LAYERS) * d.n_heads
    vectors = rows * k * d.d_model * 4 * 2
    block = d.n_heads * k * rows * k * (8 + 4)
    cross = rows**2 * 8 * 8
    orderings = 2 * PERMUTATION_CHUNK * d.n_layers * (d.n_layers + 1) // 2 * 8
    return 1000 + (vectors + block + cross + orderings) // 2**20


def rowspace_overlap_mem_mb(wildcards):
    """One head per KV head, all d_head vectors, in float32 twice (the chunks' copies and their
    concatenation); one layer's block of cosines against all (float32 and its float64 copy,
    and the cores' products); the (2, L, n_kv, L, n_kv) float64 result three times (the
    upper triangle, its mirror and the merge); plus the interpreter."""
    d = model_plan(wildcards).dims
    rows = d.n_layers * d.n_kv_heads * d.d_head
    vectors = rows * d.d_model * 4 * 2
    block = d.n_kv_heads * d.d_head * rows * (4 + 8 * 3)
    result = 3 * 2 * (d.n_layers * d.n_kv_heads) ** 2 * 8
    return 1000 + (vectors + block + result) // 2**20


def k_sweep_mem_mb(wildcards):
    """The vectors of the sampled heads in float32 twice (the chunks' copies and their
    concatenation, while loading) and one head's contiguous float32 copy; one layer's block
    of squared cosines against all (float64, and the float32 product it is squared from); the (d_head, L, L) float64 prefix similarities of every sampled head, stacked
    once more for their mean, and two of the head being mirrored; plus the interpreter. Not
    counted: the pages of the memory-mapped chunks (see match_heads_mem_mb)."""
    plan = model_plan(wildcards)
    d = plan.dims
    per_head = d.n_layers * d.d_head * d.d_model
    vectors = per_head * 4 * (2 * len(plan.heads) + 1)
    block = d.d_head**2 * d.n_layers * (8 + 4)
    matrices = (2 * len(plan.heads) + 2) * d.d_head * d.n_layers**2 * 8
    return 1000 + (vectors + block + matrices) // 2**20


def expert_alignment_mem_mb(wildcards, input):
    """The first k energies of every (layer, unit, head) in float64 twice (the chunks' copies
    and the sparse layers' selection), and the table: about 30 float64 columns of one row per
    (layer, unit, head), three times while it is built and sorted; plus the interpreter and
    pandas. The rows are counted from the stored energies' headers (memory-mapped, unread).
    """
    from math import prod

    from weight_geometry.results_io import load_array

    k = int(wildcards.k)
    rows = sum(prod(load_array(p, mmap_mode="r").shape[:3]) for p in input.energy)
    return 1000 + rows * (2 * k * 8 + 3 * 30 * 8) // 2**20


def composition_mem_mb(wildcards):
    """The four (L, h, d_head, d) float32 factor arrays (concatenated from the chunks' memory
    maps), one later layer's three sides and one layer pair's (3 h d_head, h d_head) float32
    block with its float64 sums; the null's two random layers of NULL_HEADS heads (float64
    weights and factors); the (3, L h, L h) float64 scores and their four test arrays (six
    where head sizes vary: the per-pair null mean and std, Gemma 4); plus the interpreter and
    torch."""
    from weight_geometry.composition import NULL_HEADS

    d = model_plan(wildcards).dims
    factors = 4 * d.n_layers * d.n_heads * d.d_head * d.d_model * 4
    block = 3 * (d.n_heads * d.d_head) * (d.d_model + d.n_heads * d.d_head * 3) * 4
    per_head = d.d_model * 8 * 12 + 3 * NULL_HEADS * d.d_head * 12
    null = 2 * NULL_HEADS * d.d_head * per_head
    tests = (5 if d.head_dims is None else 7) * 3 * (d.n_layers * d.n_heads) ** 2 * 8
    return 1500 + (factors + block + null + tests) // 2**20


def composition_runtime(wildcards):
    """Minutes: 3 (L h d_head)^2 d flops of float32 GEMMs at 1e10 a second, plus start-up."""
    d = model_plan(wildcards).dims
    flops = 3 * (d.n_layers * d.n_heads * d.d_head) ** 2 * d.d_model
    return 10 + int(flops / 1e10 / 60)


def read_write_mem_mb(wildcards):
    """The four (L, h, d_head, d) float32 vector arrays (concatenated from the chunks' memory
    maps) and the top-k write rows; one later layer's products of its (h + 2 n_kv) d_head read
    bases with every earlier write (float32, float64 squares, the Grams' copies); the five
    (3, L, h, L, h) float64 pair arrays; plus the interpreter."""
    d, k = model_plan(wildcards).dims, int(wildcards.k)
    vectors = 4 * d.n_layers * d.n_heads * d.d_head * d.d_model * 4
    writes = d.n_layers * d.n_heads * k * d.d_model * 4
    rows = (d.n_heads + 2 * d.n_kv_heads) * d.d_head
    products = rows * d.n_layers * d.n_heads * k * 24
    pairs = 5 * 3 * (d.n_layers * d.n_heads) ** 2 * 8
    return 1000 + (vectors + writes + products + pairs) // 2**20


def extraction_runtime(wildcards):
    """Minutes: generous for CPU SVD-free extraction (~1 s per 1e10 flops) plus start-up."""
    d = model_plan(wildcards).dims
    n_layers = int(wildcards.last) - int(wildcards.first) + 1
    flops = n_layers * 8 * d.d_ff * d.d_model**2
    return 10 + int(flops / 1e10 / 60)


def hub_download(wildcards):
    """The download record of a hub-id model (none for local sources)."""
    if model_plan(wildcards).hub_id:
        return [f"resources/hub/{wildcards.model}.json"]
    return []


def uses_gpu(wildcards):
    return 0 if PLAN.device == "cpu" else 1


def analysis_inputs(wildcards):
    """Named inputs of the figures and report rules (see results_io.load_analysis)."""
    base = f"results/{wildcards.model}"
    kdir = f"{base}/k{wildcards.k}"
    return {
        "model": f"{base}/model.json",
        "similarity": similarity_files(lambda p: p.similarity_heads)(wildcards),
        "similarity_mean": f"{kdir}/similarity_mean.npy",
        "bottleneck": f"{kdir}/bottleneck.parquet",
        "alignment": f"{kdir}/alignment.parquet",
        "layers": f"{kdir}/layers.parquet",
        "weight_ranks": f"{base}/effective_ranks.parquet",
        "kernel_ranks": f"{base}/kernel_effective_ranks.parquet",
        "singular_values": chunk_files("singular_values.npy")(wildcards),
        "best_match": f"{kdir}/best_match.npy",
        "layer_pairs": f"{kdir}/layer_pairs.parquet",
        "every_head": f"{kdir}/heads.parquet",
        "within_layer": f"{kdir}/within_layer.parquet",
        "overlaps": f"{base}/rowspace_overlap.npy",
        "ksweep": f"{base}/ksweep.parquet",
        "alignment_experts": f"{kdir}/alignment_experts.parquet",
        **(circuit_inputs(wildcards) if PLAN.circuits else {}),
    }


def circuit_inputs(wildcards):
    """With circuits on, the tables of the report's Circuits section and its figures' tables."""
    base = f"results/{wildcards.model}"
    return {
        "composition_layers": f"{base}/circuits/composition_layers.parquet",
        "composition_top": f"{base}/circuits/composition_top.parquet",
        "read_write": f"{base}/k{wildcards.k}/read_write.parquet",
    }


def circuit_figure_files(wildcards):
    """The report's circuit figures (none with circuits off)."""
    if not PLAN.circuits:
        return []
    kdir = f"results/{wildcards.model}/k{wildcards.k}"
    return [f"{kdir}/figures/{name}.png" for name in CIRCUIT_FIGURES]


def figure_inputs(wildcards):
    """The figures' inputs: the report's but the k-sweep, which k_sweep draws itself, the
    layer table, whose columns the figures read from its sources, and the circuits' tables
    (rule circuit_figures draws them); so the figures (the longest job after extraction) wait
    for none of them."""
    return {
        name: path
        for name, path in analysis_inputs(wildcards).items()
        if name not in ("ksweep", "layers", "composition_layers", "composition_top")
        and name not in ("read_write", "alignment_experts")
    }


def compare_inputs(wildcards):
    """Named inputs of the comparison: every model's record and per-layer table at this k."""
    return {
        "models": [f"results/{name}/model.json" for name in PLAN.compared()],
        "layers": [
            f"results/{name}/k{wildcards.k}/layers.parquet" for name in PLAN.compared()
        ],
    }


def trajectory_inputs(wildcards):
    """Named inputs of a series' trajectory at k, by step: each checkpoint's record,
    layer table and bases (every extraction job's vectors, by checkpoint)."""
    names = PLAN.series[wildcards.series]
    return {
        "models": [f"results/{m}/model.json" for m in names],
        "layers": [f"results/{m}/k{wildcards.k}/layers.parquet" for m in names],
        "vectors": [
            f"results/{m}/bases/{chunk_dir_name(a, b)}/vectors.npy"
            for m in names
            for a, b in PLAN.models[m].chunks
        ],
    }


def trajectory_mem_mb(wildcards):
    """Three checkpoints' top-k bases in float32 (the first, the last and the current one, and
    the copy each load concatenates), one layer's (h k)^2 float64 block, the tables; plus the
    interpreter, pandas and matplotlib. Independent of the number of steps but for the
    tables (a few hundred bytes per step and layer)."""
    d, k = PLAN.models[PLAN.series[wildcards.series][0]].dims, int(wildcards.k)
    bases = 3 * 2 * d.n_layers * d.n_heads * k * d.d_model * 4
    block = (d.n_heads * k) ** 2 * 12
    tables = len(PLAN.series[wildcards.series]) * d.n_layers * (d.n_heads + 1) * 1000
    return 1500 + (bases + block + tables) // 2**20


def download_targets():
    return [f"resources/hub/{name}.json" for name, p in PLAN.models.items() if p.hub_id]


def check_writable():
    """Before the first job (Snakemake's onstart: not in a dry run, and only when some job is to
    run): one line and exit status 1 unless this process may write every directory the jobs
    to run write their outputs, logs and benchmarks in (or make them in). Snakemake would
    otherwise stop in its own traceback when it removes an old output or log there."""
    paths = set()
    for job in workflow.dag.needrun_jobs():
        paths.update(map(str, [*job.output, *job.log]))
        if job.benchmark:
            paths.add(str(job.benchmark))
    found = unwritable_directory(sorted(paths))
    if found:
        directory, why, path = found
        sys.stderr.write(
            f"error: {directory} is not writable ({why}); this run writes {path} in it"
            " (allowed: a directory this user may write)\n"
        )
        sys.exit(1)


onstart:
    check_writable()


def all_targets():
    reports = [
        f"results/{name}/k{k}/report.md" for name in PLAN.models for k in PLAN.top_k
    ]
    if PLAN.circuits:
        reports += [
            f"results/{name}/circuits/composition_top.parquet" for name in PLAN.models
        ]
    if len(PLAN.compared()) > 1:
        reports += [f"results/compare/k{k}/report.md" for k in PLAN.top_k]
    reports += [
        f"results/{series}/trajectory/k{k}/report.md"
        for series in PLAN.series
        for k in PLAN.top_k
    ]
    return reports
