"""Bad input: one clear line naming the key/file, the value and what is allowed; non-zero exit;
no traceback; nothing that looks like a complete output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (
    NEEDS_NO_CUDA,
    assert_ok,
    error_line,
    make_llama_checkpoint,
    run_snakemake,
)

pytestmark = pytest.mark.workflow


def config_for(source, **extra):
    return {"models": {"tiny": {"source": str(source)}}, "device": "cpu", **extra}


@pytest.mark.parametrize(("extra", "fragments"), [
    ({"top_k": 0}, ["top_k", "0", ">= 1"]),
    ({"top_k": 25}, ["top_k", "25", "d_head = 24"]),
    ({"top_k": "abc"}, ["top_k", "'abc'", "integer"]),
    ({"heads": [0, 7]}, ["heads", "7", "h = 4"]),
    ({"heads": {"sample": 0}}, ["heads.sample", "0"]),
    ({"primary_head": 4}, ["primary_head", "4", "h = 4"]),
    ({"bottleneck": 4}, ["bottleneck", "4", "[0, 4)"]),
    ({"bottleneck": "middle"}, ["bottleneck", "'middle'", "auto"]),
    ({"device": "tpu"}, ["device", "'tpu'", "auto, cpu, cuda"]),
    ({"layers_per_job": -1}, ["layers_per_job", "-1"]),
    ({"topk": 20}, ["config", "'topk'", "did you mean 'top_k'?", "fold_norms"]),
])
def test_bad_config_value(tmp_path, tiny_checkpoint, extra, fragments):
    # A real run, not a dry one: no results/ then means that no job started.
    line = error_line(run_snakemake(tmp_path, config=config_for(tiny_checkpoint, **extra)))
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "results").exists()


def test_list_from_command_line_is_parsed(tmp_path, tiny_checkpoint):
    """``--config top_k=[4,10]`` arrives as a list of strings; it must plan both k."""
    proc = run_snakemake(tmp_path, "-n", "--config", "top_k=[4,10]",
                         config=config_for(tiny_checkpoint))
    assert proc.returncode == 0, proc.stderr
    assert "results/tiny/k4/report.md" in proc.stdout
    assert "results/tiny/k10/report.md" in proc.stdout


def test_user_configfile_replaces_default_models(tmp_path, tiny_checkpoint):
    proc = run_snakemake(tmp_path, "-n", config=config_for(tiny_checkpoint))
    assert proc.returncode == 0, proc.stderr
    assert "results/tiny/" in proc.stdout
    assert "smollm2" not in proc.stdout


def test_command_line_models_join_a_configfiles_models(tmp_path, tiny_checkpoint):
    """``--configfile`` with models and ``--config models=...`` beside it: the command line's
    model is checked and planned too (it was silently dropped)."""
    bad = run_snakemake(tmp_path, "-n", "--config", "models={other: {source: /nope}}",
                        config=config_for(tiny_checkpoint))
    line = error_line(bad)
    assert "models.other.source" in line and "/nope" in line, line
    proc = run_snakemake(tmp_path, "-n", "--config",
                         f"models={{other: {{source: {tiny_checkpoint}}}}}",
                         config=config_for(tiny_checkpoint))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "results/tiny/" in proc.stdout and "results/other/" in proc.stdout


def test_models_given_as_a_list(tmp_path, tiny_checkpoint):
    config = {"models": [{"source": str(tiny_checkpoint)}], "device": "cpu"}
    line = error_line(run_snakemake(tmp_path, "-n", config=config))
    assert "models: [{'source'" in line and "is not allowed (in " in line, line
    assert "name: {source: ...}" in line, line


def test_missing_source(tmp_path):
    line = error_line(run_snakemake(tmp_path, "-n", config=config_for(tmp_path / "nope")))
    assert "models.tiny.source" in line and "nope" in line and "does not exist" in line


@pytest.mark.parametrize(("source", "fragment"), [
    ("ckpt/x", "; no local path {} exists either"),            # taken for a hub id
    ("ckpt/x/m.gguf", "does not exist (resolved: {}); allowed:"),
])
def test_relative_source_is_shown_resolved_against_the_workdir(tmp_path, source, fragment):
    """A relative source is relative to the working directory (-d): a missing one is shown
    there, also when, looking like org/name, it was tried as a hub id."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    line = error_line(run_snakemake(tmp_path / "run", "-n", config=config_for(source), env=env))
    assert f"error: models.tiny.source: source '{source}' " in line, line
    assert fragment.format(tmp_path / "run" / source) in line, line


def test_hub_id_not_cached_offline(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_snakemake(tmp_path, "-n", config=config_for("Qwen/Qwen2.5-3B"), env=env)
    line = error_line(proc)
    assert "Qwen/Qwen2.5-3B" in line and "not in the local Hugging Face cache" in line


def _rewrite(ckpt, edit):
    from safetensors.torch import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    ckpt = make_llama_checkpoint(tmp_path / "ckpt")
    _rewrite(ckpt, lambda t: t.pop("model.layers.2.mlp.gate_proj.weight"))
    line = error_line(run_snakemake(tmp_path / "run", "-n", config=config_for(ckpt)))
    assert "model.layers.2.mlp.gate_proj.weight" in line and "no tensor" in line


def test_shape_contradicts_config(tmp_path):
    ckpt = make_llama_checkpoint(tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["head_dim"] = 16
    (ckpt / "config.json").write_text(json.dumps(cfg))
    line = error_line(run_snakemake(tmp_path / "run", "-n", config=config_for(ckpt)))
    assert "q_proj.weight" in line and "(96, 64)" in line and "(64, 64)" in line


def test_unsupported_architecture(tmp_path):
    ckpt = make_llama_checkpoint(tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    line = error_line(run_snakemake(tmp_path / "run", "-n", config=config_for(ckpt)))
    assert "'mamba' is not supported" in line and "llama" in line


def test_nan_tensor_fails_its_job_with_one_line(tmp_path):
    """Found only when the data is read: the extraction job fails, leaves no outputs, and the
    one line reaches the console."""
    ckpt = make_llama_checkpoint(tmp_path / "ckpt")

    def poison(t):
        t["model.layers.1.self_attn.v_proj.weight"][0, 0] = np.nan

    _rewrite(ckpt, poison)
    proc = run_snakemake(tmp_path / "run", config=config_for(ckpt))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "model.layers.1.self_attn.v_proj.weight contains NaN or Inf" in out
    assert "logs/tiny/extract_layers000-003.log" in out
    assert not list((tmp_path / "run").glob("results/tiny/bases/*/*.npy"))
    assert not list((tmp_path / "run").glob("results/tiny/k*/report.md"))


@NEEDS_NO_CUDA
def test_device_cuda_without_a_gpu_fails_its_job_with_one_line(tmp_path, tiny_checkpoint):
    """``device: cuda`` is a valid value that only the extraction job, on its node, can test:
    without a GPU it fails with one line in the console and leaves no outputs."""
    proc = run_snakemake(tmp_path, config=config_for(tiny_checkpoint, device="cuda"))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert ("error: device: 'cuda' was requested but torch.cuda.is_available() is False"
            " (allowed here: auto, cpu)") in out
    assert "Traceback" not in out
    assert "logs/tiny/extract_layers000-003.log" in out
    assert not list(tmp_path.glob("results/tiny/bases/*/*.npy"))


def test_model_name_with_a_dot_matches_only_itself(tmp_path, tiny_checkpoint):
    """Model names may hold '.', which the model wildcard's pattern must take literally:
    ``tiny.1``'s rules must not claim ``results/tinyx1/`` (a KeyError traceback before)."""
    config = {"models": {"tiny.1": {"source": str(tiny_checkpoint)}}, "device": "cpu"}
    proc = run_snakemake(tmp_path, "-n", "results/tinyx1/model.json", config=config)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert "No rule to produce results/tinyx1/model.json" in proc.stdout + proc.stderr
    proc = run_snakemake(tmp_path, "-n", "results/tiny.1/model.json", config=config)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("target", [
    "results/tiny/k25/report.md",              # k > d_head = 24 (k = 4 is planned)
    "results/tiny/k0/report.md",
    "results/tiny/k4/similarity_head9.npy",     # h = 4
    "results/tiny/k4/similarity_head3.npy",     # a real head, but not in the plan's sample
    "results/tiny/bases/layers002-009/vectors.npy",
])
def test_target_outside_the_plan_has_no_rule(tmp_path, tiny_checkpoint, target):
    """A k, head or layer range that the config does not ask for was never checked: asking
    for it by name plans nothing (it used to run jobs that failed with tracebacks, leaving
    complete-looking tables for k = 25 behind)."""
    config = config_for(tiny_checkpoint, top_k=4, heads=[0, 1])
    proc = run_snakemake(tmp_path, target, config=config)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert f"No rule to produce {target}" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_zero_threads_for_the_extraction_run_it_with_one(tmp_path, tiny_checkpoint):
    """``--set-threads extract_layers=0`` used to stop the job with torch's "set_num_threads
    expects a positive integer"; it runs with one thread."""
    config = config_for(tiny_checkpoint, top_k=4)
    workdir = tmp_path / "run"
    assert_ok(run_snakemake(workdir, "--until", "extract_layers", "--set-threads",
                            "extract_layers=0", config=config))
    assert (workdir / "results/tiny/bases/layers000-003/weight_ranks.parquet").exists()
    assert "(1 at a time)" in (workdir / "logs/tiny/extract_layers000-003.log").read_text()
