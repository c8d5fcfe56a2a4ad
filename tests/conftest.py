"""Shared fixtures: tiny random checkpoints made with transformers, and Snakemake runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tiny Llama with GQA (4 query heads, 2 KV heads) and an explicit head_dim != d // h, so a
# d // h bug or a wrong GQA mapping changes the numbers.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=128)


#: Where the library's numerical tests run: the CPU, and CUDA on a machine with a GPU (CI has
#: none: those cases are skipped there; on a GPU node they check ``device: cuda``).
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
#: For what only a machine without a GPU shows (``device: cuda`` failing there).
NEEDS_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason="needs a machine without a GPU")


def config_schema() -> dict:
    """workflow/schemas/config.schema.yaml, parsed."""
    return yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())


def spread_parameters(model, weights: bool = True) -> None:
    """Spread a freshly built model's parameters in place, so that no structure of the
    initialisation (routers at zero, gains at one, equal row norms) hides an error: norm gains
    uniform in [0.5, 1.5), and with ``weights`` every other parameter Gaussian with its rows
    scaled by factors uniform in [0.5, 1.5)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            elif weights:
                p.copy_(torch.randn_like(p) * (torch.rand(p.shape[:-1])[..., None] + 0.5))


def make_llama_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised Llama built by transformers to ``path``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    # Default init gives near-identical scales; spread them so ranks and spectra differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(torch.rand(p.shape[0], 1) + 0.5)
    model.save_pretrained(path)
    return path


def snakemake_command(workdir: Path, *args: str, config: dict | None = None, cores: int = 2,
                      snakefile: Path = REPO / "Snakefile") -> list[str]:
    """``python -m snakemake -s snakefile -d workdir *args --cores cores --resources gpu=1``,
    with ``config`` (if given) written to ``workdir/config.yaml`` and passed as
    ``--configfile``. ``workdir`` is created.

    Both cores by default, to keep the suite short; the README's ``--cores 1`` is what
    ``test_default_model`` runs, and no output depends on the cores (the incremental tests
    compare ``--cores 1`` runs with ``--cores 2`` ones byte for byte).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir),
           *args, "--cores", str(cores), "--resources", "gpu=1"]
    if config is not None:
        cfg = workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(cfg)]
    return cmd


def run_snakemake(workdir: Path, *args: str, config: dict | None = None,
                  timeout: int = 600, env: dict | None = None,
                  cores: int = 2) -> subprocess.CompletedProcess:
    """Run :func:`snakemake_command` with ``workdir`` as working directory."""
    cmd = snakemake_command(workdir, *args, config=config, cores=cores)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=workdir)


def markdown_table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first markdown table after ``heading`` in ``text``, as column -> cell."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


def orthonormal_rows(m: np.ndarray) -> np.ndarray:
    """``(..., k, d)`` -> orthonormal rows spanning the same row spaces: QR of the transpose,
    columns' signs fixed by R's diagonal (so Gaussian input gives Haar-random subspaces)."""
    q, r = np.linalg.qr(np.swapaxes(m, -1, -2))
    return np.swapaxes(q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :], -1, -2)


def haar_bases(rng: np.random.Generator, shape: tuple[int, ...], k: int, d: int) -> np.ndarray:
    """``shape + (k, d)`` orthonormal rows spanning independent Haar-random k-subspaces."""
    return orthonormal_rows(np.swapaxes(rng.standard_normal((*shape, d, k)), -1, -2))


def naive_kernel(w_q: np.ndarray, w_k: np.ndarray, head: int, d_head: int) -> np.ndarray:
    """The reference kernel ``A_i = W_Q_i^T W_K_j`` of query head ``i = head``, ``(d, d)``,
    formed explicitly in float64 (docs/SCIENCE.md): ``W_Q_i`` is rows ``[i d_head, (i + 1)
    d_head)`` of ``w_q`` (``(h d_head, d)``, nn.Linear layout), ``W_K_j`` the same rows of KV head
    ``j = i // (h // n_kv)`` of ``w_k`` (``(n_kv d_head, d)``); ``h`` and ``n_kv`` are read off
    the shapes. A ``w_k`` with a row block per query head (``repeat_kv``'s output) pairs head
    ``i`` with block ``i``."""
    w_q, w_k = np.asarray(w_q, dtype=np.float64), np.asarray(w_k, dtype=np.float64)
    (h, rest_q), (n_kv, rest_k) = divmod(len(w_q), d_head), divmod(len(w_k), d_head)
    assert rest_q == rest_k == 0 and h % n_kv == 0, (w_q.shape, w_k.shape, d_head)
    group = h // n_kv
    kv = head // group
    return w_q[head * d_head:(head + 1) * d_head].T @ w_k[kv * d_head:(kv + 1) * d_head]


def naive_kernel_svd(w_q: np.ndarray, w_k: np.ndarray, head: int,
                     d_head: int) -> tuple[np.ndarray, np.ndarray]:
    """``(s, vt)``: all ``d`` singular values (descending) and right singular vectors (rows)
    of :func:`naive_kernel`, by numpy's full ``d x d`` SVD in float64: the O(d^3) reference
    the library's factored route (docs/SCIENCE.md) must reproduce."""
    _, s, vt = np.linalg.svd(naive_kernel(w_q, w_k, head, d_head))
    return s, vt


def reference_eff_rank(w: np.ndarray) -> float:
    """Roy & Vetterli's effective rank by numpy's float64 SVD: ``exp(-sum p log p)``, ``p =
    sigma / sum(sigma)`` over the nonzero ``sigma``, i.e. ``sigma > sigma_max max(rows, cols)
    eps32`` (the ranks module's documented threshold)."""
    s = np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)
    s = s[s > s.max() * max(w.shape) * np.finfo(np.float32).eps]
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def gaussian_kernel_bases(rng: np.random.Generator, n_layers: int, n_heads: int, n_kv: int,
                          d_head: int, d: int, k: int) -> np.ndarray:
    """``(n_layers, n_heads, k, d)``: the top-k kernel subspaces of Gaussian ``W_Q``, ``W_K``
    (float64, drawn whole from ``rng``) through the library's ``kernels.head_subspaces``. The
    layers go as one model of ``n_layers h`` heads and ``n_layers n_kv`` KV heads (head ``l h +
    i`` pairs with KV head ``l n_kv + i // (h // n_kv)``, as in layer ``l``)."""
    from weight_geometry.kernels import head_subspaces

    w_q = torch.from_numpy(rng.standard_normal((n_layers * n_heads * d_head, d)))
    w_k = torch.from_numpy(rng.standard_normal((n_layers * n_kv * d_head, d)))
    vectors = head_subspaces(w_q, w_k, n_layers * n_heads, n_layers * n_kv, d_head)[0]
    return vectors.numpy().reshape(n_layers, n_heads, d_head, d)[:, :, :k]


def assert_one_line(err: BaseException, *fragments: object) -> str:
    """The message of ``err`` (a UserError), which must be one line holding every fragment
    (``str()`` of each: a path names the file); returned for further checks."""
    msg = str(err)
    assert "\n" not in msg, f"not one line: {msg!r}"
    for fragment in map(str, fragments):
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def hub_cache(hf_home: Path, repo_id: str, files: dict[str, str | bytes],
              commit: str = "0" * 40) -> Path:
    """A Hugging Face cache under ``hf_home`` (what ``HF_HOME`` names) holding ``files`` (name ->
    text or bytes) of ``repo_id`` at ``commit``, which ``refs/main`` points to:
    ``hub/models--org--name/{refs/main, snapshots/<commit>/<files>}``. Returns the snapshot
    directory."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, content in files.items():
        if isinstance(content, bytes):
            (snapshot / name).write_bytes(content)
        else:
            (snapshot / name).write_text(content)
    return snapshot


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a failed run, which must show no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"snakemake failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_llama_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def tiny_run_config(checkpoint: Path, **changes) -> dict:
    """The config of :func:`tiny_run`, with ``changes`` (a rerun that must give its numbers):
    raw weights (``fold_norms: false``), the notebook's definitions the tests check."""
    return {"models": {"tiny": {"source": str(checkpoint)}}, "top_k": [4, 10], "heads": "all",
            "primary_head": 1, "bottleneck": 2, "device": "cpu", "fold_norms": False,
            "circuits": True, **changes}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_checkpoint) -> Path:
    """One complete workflow run on the tiny checkpoint: two k values, all heads, primary 1."""
    workdir = tmp_path_factory.mktemp("run")
    proc = run_snakemake(workdir, config=tiny_run_config(tiny_checkpoint))
    assert_ok(proc)
    return workdir
