"""The extraction pass (write_layers, as the extract_layers job runs it) on a real tiny Llama
checkpoint written by transformers, its files read back with results_io's loaders."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    DEVICES,
    NEEDS_NO_CUDA,
    assert_one_line,
    naive_kernel,
    naive_kernel_svd,
    reference_eff_rank,
)

from weight_geometry import extraction
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.device import release_gpu, resolve_device
from weight_geometry.errors import UserError
from weight_geometry.extraction import (
    LayerResult,
    extract_layer,
    in_threads,
    layer_workers,
    run_extraction_job,
    write_layers,
)
from weight_geometry.ranks import RANK_COLUMNS
from weight_geometry.results_io import (
    BASES_FILES,
    chunk_dir_name,
    load_layers,
    load_rank_tables,
    write_rows,
)

D, D_FF, L, H, N_KV, D_HEAD = 32, 48, 2, 4, 2, 16   # d_head != d // h on purpose

NAMES = {"W_Q": "self_attn.q_proj", "W_K": "self_attn.k_proj", "W_V": "self_attn.v_proj",
         "W_O": "self_attn.o_proj", "W_gate": "mlp.gate_proj", "W_up": "mlp.up_proj",
         "W_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=D_FF, num_hidden_layers=L,
                         num_attention_heads=H, num_key_value_heads=N_KV, head_dim=D_HEAD,
                         vocab_size=64, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(config).float()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(str(path))
    weights = {}
    for layer in range(L):
        block = model.model.layers[layer]
        for wt, attr in NAMES.items():
            mod = block
            for part in attr.split("."):
                mod = getattr(mod, part)
            weights[wt, layer] = mod.weight.detach().double().numpy().copy()
    return path, weights


#: float32 Gram (ranks module): ||E|| ~ GRAM_NOISE eps32 sigma_max^2, so singular values are
#: exact to sqrt(4 eps32) sigma_max = 7e-4 sigma_max, traces and energies to ~1e-6 relative.
SIGMA_ATOL = np.sqrt(4 * np.finfo(np.float32).eps)
TRACE_RTOL = 1e-6


def _bases_paths(directory) -> dict:
    return {name: directory / f"{name}.npy" for name in BASES_FILES}


def _extract(ckpt, layers: range, root, device: str = "cpu", workers: int = 1,
             compute_ranks: bool = True) -> SimpleNamespace:
    """What the extract_layers job writes for ``layers`` (:func:`write_layers` into
    ``root/layers{first}-{last}/``, the rank rows through ``write_rows``), read back as the later
    jobs read it: the arrays by ``load_layers``, the rank table by ``load_rank_tables``."""
    directory = root / chunk_dir_name(layers.start, layers.stop - 1)
    paths = _bases_paths(directory)
    rows = write_layers(ckpt, layers, torch.device(device), False, paths, compute_ranks,
                        workers)
    write_rows(directory / "weight_ranks.parquet", RANK_COLUMNS, rows)
    return SimpleNamespace(**{name: load_layers([path]) for name, path in paths.items()},
                           weight_ranks=load_rank_tables([directory / "weight_ranks.parquet"]))


def test_checkpoint_dims_and_reads(tiny_llama):
    path, weights = tiny_llama
    ckpt = open_checkpoint(str(path))
    dims = ckpt.dims
    assert (dims.n_layers, dims.d_model, dims.d_ff, dims.n_heads, dims.n_kv_heads,
            dims.d_head) == (L, D, D_FF, H, N_KV, D_HEAD)
    for (wt, layer), w in weights.items():
        got = ckpt.read_layer(layer)[wt]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, w.astype(np.float32), err_msg=f"{wt} layer {layer}")


@pytest.mark.parametrize("device", DEVICES)
def test_extraction_matches_naive_svd(tiny_llama, tmp_path, device):
    path, weights = tiny_llama
    ckpt = open_checkpoint(str(path))
    res = _extract(ckpt, range(L), tmp_path, device)
    assert res.vectors.shape == (L, H, D_HEAD, D)
    assert res.singular_values.shape == (L, H, D_HEAD)
    assert res.ffn_input_energy.shape == (L, H, D_HEAD)
    assert res.ffn_input_norm2.shape == (L,)
    assert res.ffn_input_singular_values.shape == (L, D)
    for layer in range(L):
        w_q, w_k = weights["W_Q", layer], weights["W_K", layer]
        gate = weights["W_gate", layer]
        assert res.ffn_input_norm2[layer] == pytest.approx(np.sum(gate**2), rel=TRACE_RTOL)
        s_gate = np.linalg.svd(gate, compute_uv=False)               # (D,): D_FF > D
        assert res.ffn_input_singular_values.dtype == np.float64
        np.testing.assert_allclose(res.ffn_input_singular_values[layer], s_gate,
                                   rtol=1e-5, atol=SIGMA_ATOL * s_gate[0])
        for i in range(H):
            s_ref, vt_ref = naive_kernel_svd(w_q, w_k, i, D_HEAD)
            np.testing.assert_allclose(res.singular_values[layer, i], s_ref[:D_HEAD],
                                       rtol=1e-8, atol=1e-10 * s_ref[0])
            v = res.vectors[layer, i].astype(np.float64)
            np.testing.assert_allclose(v @ v.T, np.eye(D_HEAD), atol=1e-6)
            # Both sides of the kernel and of the OV circuit W_O_i W_V_j, formed in float64.
            u = res.query_vectors[layer, i].astype(np.float64)
            formed = u.T @ np.diag(res.singular_values[layer, i]) @ v
            np.testing.assert_allclose(formed, naive_kernel(w_q, w_k, i, D_HEAD),
                                       atol=1e-5 * s_ref[0])
            ov_ref = naive_kernel(weights["W_O", layer].T, weights["W_V", layer], i, D_HEAD)
            t_ref = np.linalg.svd(ov_ref, compute_uv=False)
            np.testing.assert_allclose(res.ov_singular_values[layer, i], t_ref[:D_HEAD],
                                       rtol=1e-8, atol=1e-10 * t_ref[0])
            write, read = (res.ov_write_vectors[layer, i].astype(np.float64),
                           res.ov_read_vectors[layer, i].astype(np.float64))
            for rows in (u, write, read):
                np.testing.assert_allclose(rows @ rows.T, np.eye(D_HEAD), atol=1e-5)
            np.testing.assert_allclose(write.T @ np.diag(res.ov_singular_values[layer, i]) @ read,
                                       ov_ref, atol=1e-5 * t_ref[0])
            for k in (2, 5, 9):
                assert (s_ref[k - 1] - s_ref[k]) / s_ref[0] > 1e-3, "degenerate test case"
                p_lib = v[:k].T @ v[:k]
                p_ref = vt_ref[:k].T @ vt_ref[:k]
                assert np.linalg.norm(p_lib - p_ref) < 1e-5, (layer, i, k)
                # Energy prefix sum = ||W_gate P||_F^2 with the d x d projector.
                direct = np.linalg.norm(gate @ p_ref) ** 2
                assert res.ffn_input_energy[layer, i, :k].sum() == pytest.approx(direct,
                                                                                rel=1e-5)


def test_extraction_weight_ranks(tiny_llama, tmp_path):
    path, weights = tiny_llama
    ckpt = open_checkpoint(str(path))
    res = _extract(ckpt, range(1, 2), tmp_path)    # a sub-range
    ranks = res.weight_ranks
    assert list(ranks.columns) == ["layer_idx", "weight_type", "shape", "eff_rank"]
    assert len(ranks) == 7
    assert set(ranks["layer_idx"]) == {1}
    assert list(ranks["weight_type"]) == list(NAMES)
    expected_shapes = {"W_Q": f"{H * D_HEAD}x{D}", "W_K": f"{N_KV * D_HEAD}x{D}",
                       "W_V": f"{N_KV * D_HEAD}x{D}", "W_O": f"{D}x{H * D_HEAD}",
                       "W_gate": f"{D_FF}x{D}", "W_up": f"{D_FF}x{D}",
                       "W_down": f"{D}x{D_FF}"}
    for row in ranks.itertuples():
        assert row.shape == expected_shapes[row.weight_type], row.weight_type
        ref = reference_eff_rank(weights[row.weight_type, 1])
        assert row.eff_rank == pytest.approx(ref, rel=1e-5), row.weight_type
    # Sub-range results equal the same layer from a full run.
    full = _extract(ckpt, range(L), tmp_path)
    np.testing.assert_allclose(res.singular_values[0], full.singular_values[1])


def test_write_layers_streams_the_same_arrays(tiny_llama, tmp_path):
    """The .npy files written layer by layer equal the layers' results (extract_layer) stacked,
    bit for bit; the rank rows written by pyarrow alone read back as a table of those rows."""
    path, _ = tiny_llama
    ckpt = open_checkpoint(str(path))
    names = LayerResult.array_names()
    assert set(names) == set(BASES_FILES) == {"vectors", "singular_values", "ffn_input_energy",
                                              "ffn_input_rowspace_eigenvalues",
                                              "ffn_input_norm2", "ffn_input_singular_values",
                                              "query_vectors", "ov_write_vectors",
                                              "ov_read_vectors", "ov_singular_values",
                                              "expert_energy", "expert_norm2",
                                              "expert_rowspace_eigenvalues",
                                              "expert_singular_values"}
    res = _extract(ckpt, range(L), tmp_path)
    layers = [extract_layer(ckpt, layer, torch.device("cpu")) for layer in range(L)]
    for name in names:
        stored = getattr(res, name)
        expected = np.stack([getattr(layer, name) for layer in layers])
        assert stored.dtype == expected.dtype and stored.shape == expected.shape, name
        np.testing.assert_array_equal(stored, expected, err_msg=name)
    rows = [row for layer in layers for row in layer.weight_ranks]
    pd.testing.assert_frame_equal(res.weight_ranks,
                                  pd.DataFrame(rows, columns=list(RANK_COLUMNS)))


def test_without_ranks_reads_only_what_the_geometry_needs(tiny_llama, tmp_path, monkeypatch):
    """compute_ranks=False (ranks supplied by the user): the same arrays, no rank rows, and
    only the attention weights and the FFN input are read."""
    path, _ = tiny_llama
    ckpt = open_checkpoint(str(path))
    names = LayerResult.array_names()
    full = _extract(ckpt, range(L), tmp_path / "full")
    read = []
    original = type(ckpt)._read
    monkeypatch.setattr(type(ckpt), "_read", lambda self, name: read.append(name)
                        or original(self, name))
    paths = {name: tmp_path / f"{name}.npy" for name in names}
    rows = write_layers(ckpt, range(L), torch.device("cpu"), False, paths, compute_ranks=False)
    assert rows == []
    write_rows(tmp_path / "ranks.parquet", RANK_COLUMNS, rows)
    ranks = pd.read_parquet(tmp_path / "ranks.parquet")
    assert ranks.empty and list(ranks.columns) == ["layer_idx", "weight_type", "shape",
                                                    "eff_rank"]
    assert sorted({n.split(".")[-2] for n in read}) == ["gate_proj", "k_proj", "o_proj",
                                                         "q_proj", "v_proj"]
    for name in names:
        np.testing.assert_array_equal(np.load(paths[name]), getattr(full, name), err_msg=name)


def test_layers_in_two_threads_equal_one_at_a_time(tiny_llama, tmp_path):
    """workers=2 (two layers at once, one torch thread each) gives the sequential results, in
    layer order, up to GEMM rounding, and leaves torch's thread count as it was."""
    path, _ = tiny_llama
    ckpt = open_checkpoint(str(path))
    threads = torch.get_num_threads()
    one = _extract(ckpt, range(L), tmp_path / "one")
    two = _extract(ckpt, range(L), tmp_path / "two", workers=2)
    assert torch.get_num_threads() == threads
    for name in ("singular_values", "ffn_input_energy", "ffn_input_rowspace_eigenvalues",
                 "ffn_input_norm2", "ffn_input_singular_values"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    # Same directions: |<v_two, v_one>| = 1 row by row (signs are free).
    cosines = np.abs((two.vectors.astype(np.float64) * one.vectors).sum(-1))
    np.testing.assert_allclose(cosines, 1.0, atol=1e-4)
    pd.testing.assert_frame_equal(two.weight_ranks[["layer_idx", "weight_type", "shape"]],
                                  one.weight_ranks[["layer_idx", "weight_type", "shape"]])
    np.testing.assert_allclose(two.weight_ranks["eff_rank"], one.weight_ranks["eff_rank"],
                               rtol=1e-6)


def test_in_threads_keeps_order_bounds_lookahead_and_raises():
    """Results come in input order whatever finishes first; no more than workers + 1 items
    are submitted ahead of the consumer; a worker's exception reaches the consumer."""
    import threading
    import time

    started, lock = [], threading.Lock()

    def slow_first(i):
        with lock:
            started.append(i)
        time.sleep(0.05 if i % 3 == 0 else 0.0)
        return i * i

    seen = []
    for pos, value in enumerate(in_threads(slow_first, range(12), 2)):
        assert len(started) <= pos + 3          # consumer at pos: at most workers + 1 ahead
        seen.append(value)
    assert seen == [i * i for i in range(12)]

    def fails_at_three(i):
        if i == 3:
            raise ValueError("layer 3")
        return i

    with pytest.raises(ValueError, match="layer 3"):
        list(in_threads(fails_at_three, range(8), 2))


def test_layer_workers_one_per_thread_on_cpu_one_on_gpu():
    assert layer_workers(torch.device("cpu"), 2) == 2
    assert layer_workers(torch.device("cpu"), 1) == 1
    assert layer_workers(torch.device("cuda"), 8) == 1    # a device object needs no GPU


@pytest.fixture
def torch_threads():
    """torch's thread count, restored after the test (run_extraction_job sets it); on a GPU
    machine the GPU that the test's process claimed is given back (or the Snakemake runs of
    later tests would wait for it)."""
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)
    release_gpu()


@pytest.mark.parametrize(("device", "threads", "torch_threads_set", "workers"), [
    ("cpu", 2, 2, 2),       # one layer per thread on the CPU
    ("cpu", 1, 1, 1),
    ("cpu", 0, 1, 1),       # --set-threads extract_layers=0 gives 0 threads: clamped to 1
    ("auto", 2, 2, None),   # auto resolved here: the CPU (2 workers) or a GPU (1)
])
def test_run_extraction_job_applies_the_job_policy(tiny_llama, tmp_path, monkeypatch, capsys,
                                                   torch_threads, device, threads,
                                                   torch_threads_set, workers):
    """run_extraction_job sets torch's threads, resolves the device, picks the workers, says so
    in one progress line and runs write_layers with them, returning its rank rows."""
    path, _ = tiny_llama
    ckpt = open_checkpoint(str(path))
    resolved = resolve_device(device)
    capsys.readouterr()   # on a GPU, the line naming the GPU claimed (kept by the job below)
    workers = workers or layer_workers(resolved, threads)
    calls, real = [], extraction.write_layers
    monkeypatch.setattr(extraction, "write_layers",
                        lambda *args: calls.append(args) or real(*args))
    paths = _bases_paths(tmp_path)
    rows = run_extraction_job(ckpt, range(1, L), device, threads, False, paths)
    assert torch.get_num_threads() == torch_threads_set
    [(_, layers, used, fold, given, compute_ranks, used_workers)] = calls
    assert (layers, used, fold, given, compute_ranks, used_workers) == (
        range(1, L), resolved, False, paths, True, workers)
    first, *others, peak = capsys.readouterr().out.splitlines()  # write_layers' lines between
    assert first.endswith(f"] {ckpt.path}: layers 1-{L - 1} on {resolved} ({workers} at a time)")
    assert re.fullmatch(r"\[[0-9:]+\] peak memory of this job: [0-9]+\.[0-9] MiB \(resident,"
                        r" high-water mark\)", peak), peak
    assert [line.split("] ")[1] for line in others] == [f"layer {layer} done ({layer}/{L - 1})"
                                                         for layer in range(1, L)]
    shapes = {wt: "x".join(map(str, ckpt.dims.weight_shape(wt))) for wt in NAMES}
    assert [row[:3] for row in rows] == [(1, wt, shapes[wt]) for wt in NAMES]
    assert load_layers([paths["vectors"]]).shape == (L - 1, H, D_HEAD, D)


def test_run_extraction_job_passes_compute_ranks(tiny_llama, tmp_path, torch_threads):
    path, _ = tiny_llama
    ckpt = open_checkpoint(str(path))
    assert run_extraction_job(ckpt, range(1), "cpu", 1, False, _bases_paths(tmp_path),
                              compute_ranks=False) == []


@NEEDS_NO_CUDA
def test_run_extraction_job_without_a_gpu_refuses_cuda(tiny_llama, tmp_path, torch_threads):
    path, _ = tiny_llama
    ckpt = open_checkpoint(str(path))
    with pytest.raises(UserError, match="device: 'cuda' was requested"):
        run_extraction_job(ckpt, range(1), "cuda", 1, False, _bases_paths(tmp_path))
    assert not (tmp_path / "vectors.npy").exists()


_FREE_16_MIB = """
import sys, numpy as np
from weight_geometry.extraction import unmap_large_frees
def rss_mib():
    status = open('/proc/self/status').read().split('VmRSS:')[1]
    return int(status.split()[0]) // 1024
if sys.argv[1] == 'unmap':
    assert unmap_large_frees()
for _ in range(3):
    block = np.ones(4 << 20, dtype=np.float32)   # 16 MiB, touched
    before = rss_mib()
    del block
print(before - rss_mib())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_unmap_large_frees_returns_freed_blocks():
    """glibc's default keeps a freed 16 MiB block in the heap once one of that size has been
    freed (its dynamic mmap threshold rises); after unmap_large_frees its pages go back."""
    def released(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _FREE_16_MIB, mode], capture_output=True,
                             text=True, check=True)
        return int(run.stdout)

    assert released("default") < 8, "glibc returned the block anyway: this test proves nothing"
    assert released("unmap") >= 15


def test_extraction_job_imports_neither_pandas_nor_pyarrow_before_writing():
    """The extraction job's library modules leave pandas (about 70 MiB of RSS and 0.3 s) and
    pyarrow out: their memory would add to the job's peak, which comes during the pass;
    pyarrow is imported by write_rows after it."""
    code = ("import sys\n"
            "import weight_geometry.checkpoint, weight_geometry.extraction,"
            " weight_geometry.kernels, weight_geometry.results_io, weight_geometry.rule_script\n"
            "print(' '.join(m for m in ('pandas', 'pyarrow') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert run.stdout.strip() == ""


def test_write_layers_holds_no_written_layer(tiny_llama, tmp_path, monkeypatch):
    """With one worker, a layer's result is released once written: when the next layer's
    extraction starts, nothing (write_layers, iter_layers) still references it, so its arrays
    do not add to the next layer's peak memory."""
    import weakref

    path, _ = tiny_llama
    ckpt = open_checkpoint(str(path))
    real, written = extraction.extract_layer, []

    def tracked(*args, **kwargs):
        assert all(ref() is None for ref in written), "an earlier layer is still held"
        result = real(*args, **kwargs)
        written.append(weakref.ref(result))
        return result

    monkeypatch.setattr(extraction, "extract_layer", tracked)
    paths = {name: tmp_path / f"{name}.npy" for name in LayerResult.array_names()}
    write_layers(ckpt, range(L), torch.device("cpu"), False, paths, workers=1)
    assert len(written) == L


@pytest.mark.parametrize(("tensor", "rows", "message"), [
    ("self_attn.q_proj", slice(D_HEAD, 2 * D_HEAD),
     "layer 1, head 1: the kernel W_Q_i^T W_K_j is zero"),
    ("self_attn.k_proj", slice(None), "layer 1, head 0: the kernel W_Q_i^T W_K_j is zero"),
    ("mlp.gate_proj", slice(None), "layer 1: W_gate (model.layers.1.mlp.gate_proj.weight) is"
                                   " all zeros, so the FFN alignment"),
])
def test_zero_weights_stop_with_one_line_instead_of_nan(tiny_llama, tmp_path, tensor, rows,
                                                         message):
    from safetensors.torch import load_file, save_file

    src, _ = tiny_llama
    tensors = load_file(src / "model.safetensors")
    tensors[f"model.layers.1.{tensor}.weight"][rows] = 0
    path = tmp_path / "zeroed"
    path.mkdir()
    (path / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ckpt = open_checkpoint(str(path))
    _extract(ckpt, range(1), tmp_path / "out")          # layer 0 is untouched
    with pytest.raises(UserError) as info:
        _extract(ckpt, range(2), tmp_path / "out")
    assert assert_one_line(info.value).startswith(message)


def _numpy_base(array: np.ndarray) -> np.ndarray:
    """The ndarray at the end of ``array``'s chain of views (the memory it lives in)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def test_iter_layer_holds_no_stored_tensor_between_weights(tiny_llama):
    """While suspended, iter_layer holds no stored tensor that no later weight is cut from:
    once the caller drops a weight, its memory is freed (the extraction releases W_O after
    the OV write side this way)."""
    import weakref

    path, _ = tiny_llama
    ckpt = open_checkpoint(str(path))
    seen = []
    for wt, array in ckpt.iter_layer(0):
        ref = weakref.ref(_numpy_base(array))
        del array
        assert ref() is None, f"{wt}: still held"
        seen.append(wt)
    assert seen == list(NAMES)


def test_extract_layer_hands_over_each_array_once(tiny_llama):
    """With emit, every array goes to emit once, equal bit for bit to the collected one, and
    the result holds the rank rows alone; a large array is not referenced once handed over."""
    import weakref

    path, _ = tiny_llama
    ckpt = open_checkpoint(str(path))
    collected = extract_layer(ckpt, 1, torch.device("cpu"))
    emitted, refs = {}, []

    def emit(name, array, rows=None):
        assert name not in emitted and rows is None
        assert all(ref() is None for ref in refs), "an earlier array is still held"
        emitted[name] = array.copy()
        if array.ndim == 3 and array.shape[-1] == D:  # the (h, d_head, d) ones
            refs.append(weakref.ref(_numpy_base(array)))

    streamed = extract_layer(ckpt, 1, torch.device("cpu"), emit=emit)
    assert sorted(emitted) == sorted(LayerResult.array_names())
    assert len(refs) == 4
    for name in LayerResult.array_names():
        assert getattr(streamed, name) is None
        np.testing.assert_array_equal(emitted[name], getattr(collected, name), err_msg=name)
    assert streamed.weight_ranks == collected.weight_ranks


def test_layer_writer_keeps_layer_order_per_file(tmp_path):
    """Arrays handed over out of layer order (two layer workers) are written in layer order,
    each file on its own; a layer without attention (no row) is skipped; a missing row is an
    error at the end."""
    paths = {"a": tmp_path / "a.npy", "b": tmp_path / "b.npy"}
    rows = {(name, layer): np.full((2, 3), 10 * layer + i, np.float32)
            for i, name in enumerate(paths) for layer in (0, 2, 3)}
    with extraction.LayerWriter(paths, [0, 2, 3]) as writer:
        for name, layer in [("a", 3), ("b", 2), ("a", 2), ("b", 0), ("a", 0), ("b", 3)]:
            writer.emitter(layer)(name, rows[name, layer])
        writer.emitter(0)("not_stored", np.zeros(1))
    for name in paths:
        np.testing.assert_array_equal(np.load(paths[name]),
                                      np.stack([rows[name, layer] for layer in (0, 2, 3)]))
    padded = {"a": tmp_path / "padded.npy"}
    with extraction.LayerWriter(padded, [0, 1]) as writer:     # 3 rows per head, padded to 5
        writer.emitter(1)("a", rows["a", 2].reshape(2, 3, 1), 5)
        writer.emitter(0)("a", rows["a", 0].reshape(2, 3, 1), 5)
    np.testing.assert_array_equal(np.load(padded["a"]), np.stack(
        [extraction.pad_heads(rows["a", layer].reshape(2, 3, 1), 5) for layer in (0, 2)]))
    assert np.load(padded["a"])[:, :, 3:].tobytes() == bytes(2 * 2 * 2 * 4)
    with pytest.raises(RuntimeError, match="incomplete"), \
            extraction.LayerWriter(paths, [0, 1]) as writer:
        writer.emitter(1)("a", rows["a", 0])
