"""Issue #27's fault campaign: the hostile inputs that slipped through. Each one now stops with
one ``error: ...`` line and exit status 1, leaves nothing under ``results/``, allocates nothing
in proportion to what a crafted header claims, and never reads outside the checkpoint.

The library-level tests name the exact message; one workflow run per case shows the line at
the console. Mounts (a full tmpfs, a read-only bind mount) are used where the test runs as root
and may mount; elsewhere those tests fall back to what an ordinary user sees (file modes) or
skip."""

from __future__ import annotations

import contextlib
import json
import os
import string
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LLAMA, assert_one_line, error_line, run_snakemake

from weight_geometry import hub
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.config import build_plan, user_models
from weight_geometry.errors import UserError
from weight_geometry.gguf_file import GGUFFile
from weight_geometry.results_io import load_layers, load_similarities
from weight_geometry.rule_script import peak_rss_mib
from weight_geometry.safetensors_file import directory_entries

GIB = 1 << 30
MAX_HEADER_BYTES = 100_000_000    # safetensors' own limit
CONFIG_JSON = json.dumps({**TINY_LLAMA, "model_type": "llama"})


def _config_for(source, name="tiny", **extra) -> dict:
    return {"models": {name: {"source": str(source)}}, "device": "cpu", "top_k": 4, **extra}


def _stops_planning(workdir: Path, config: dict | None = None, *args: str,
                    env: dict | None = None) -> str:
    """A real run (not a dry one) that stops before any job: its one error line, exit status 1,
    and no ``results/`` (nor ``logs/``) left behind."""
    proc = run_snakemake(workdir, *args, config=config, env=env)
    line = error_line(proc)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()
    return line


def _hf_dir(path: Path) -> Path:
    """A directory with a valid config.json of conftest's tiny Llama (and no weights)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(CONFIG_JSON)
    return path


# --- 1. a crafted header size: refused before anything of that size is read or allocated ---


def _sparse_safetensors(path: Path, header_bytes: int) -> Path:
    """A sparse file whose 8-byte header length (``header_bytes``) matches its size: it takes
    no disk space, however large it claims to be."""
    with open(path, "wb") as fh:
        fh.write(header_bytes.to_bytes(8, "little"))
        fh.truncate(8 + header_bytes)
    return path


@pytest.mark.parametrize("header_bytes", [40 * GIB, GIB, MAX_HEADER_BYTES + 1])
def test_huge_safetensors_header_is_refused_unread(tmp_path, header_bytes):
    """40 GiB: a MemoryError traceback before; 1 GiB: read (1.47 GB peak), then a JSON error."""
    ckpt = _hf_dir(tmp_path / "ckpt")
    weights = _sparse_safetensors(ckpt / "model.safetensors", header_bytes)
    before = peak_rss_mib()
    with pytest.raises(UserError) as info:
        open_checkpoint(str(ckpt))
    assert peak_rss_mib() - before < 64
    assert str(info.value) == (
        f"{weights}: the safetensors header is {header_bytes} bytes long (allowed: at most"
        f" {MAX_HEADER_BYTES}, the format's own limit; a crafted or corrupt file?)")


def test_huge_json_file_is_refused_unread(tmp_path):
    """config.json (and a shard index) are read whole: one of 40 GiB is refused by its size."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with open(ckpt / "config.json", "wb") as fh:
        fh.truncate(40 * GIB)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(ckpt))
    assert_one_line(info.value, ckpt / "config.json", f"{40 * GIB} bytes", "at most")


def _gguf_string(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def _gguf(path: Path, body: bytes, *, n_kv: int = 1, n_tensors: int = 0,
          size: int | None = None) -> Path:
    """A GGUF v3 header with ``body`` after its counts, made sparse up to ``size`` bytes."""
    with open(path, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body)
        if size is not None:
            fh.truncate(size)
    return path


_ARCH = _gguf_string(b"general.architecture") + struct.pack("<I", 8) + _gguf_string(b"llama")


@pytest.mark.parametrize(("body", "n_kv", "n_tensors", "size", "expected"), [
    # a metadata string of 40 GiB, as long as the (sparse) file: bytes(...) copied it
    (_gguf_string(b"general.name") + struct.pack("<IQ", 8, 40 * GIB), 1, 0, 41 * GIB,
     "GGUF metadata general.name: a string of 42949672960 bytes (allowed: at most 67108864"),
    # a metadata key of 40 GiB
    (struct.pack("<Q", 40 * GIB), 1, 0, 41 * GIB,
     "GGUF metadata key 1: a string of 42949672960 bytes (allowed: at most 65536"),
    # a string array of 2^40 items: a loop over each (at 8 bytes, more than the file holds)
    (_ARCH + _gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 40), 2, 0,
     GIB, "GGUF metadata tokenizer.ggml.tokens: an array of 1099511627776 items (allowed: at"
          " most 16777216"),
    # 2^40 tensors in the directory: a list entry for each
    (_ARCH, 1, 1 << 40, GIB, "GGUF header: 1099511627776 tensors (allowed: at most 1048576"),
    (b"", 1 << 40, 0, GIB, "GGUF header: 1099511627776 metadata entries (allowed: at most"
                           " 1048576"),
])
def test_huge_gguf_metadata_is_refused_uncopied(tmp_path, body, n_kv, n_tensors, size,
                                                expected):
    path = _gguf(tmp_path / "x.gguf", body, n_kv=n_kv, n_tensors=n_tensors, size=size)
    before = peak_rss_mib()
    with pytest.raises(UserError) as info:
        GGUFFile(path)
    assert peak_rss_mib() - before < 64
    assert_one_line(info.value, path, expected, "a crafted or corrupt file?")


@pytest.mark.parametrize("body", [
    _gguf_string(b"general.name") + struct.pack("<IQ", 8, 4096) + b"abc",     # past the end
    _gguf_string(b"x") + struct.pack("<IIQ", 9, 8, 1000) + bytes(64),          # 1000 strings
])
def test_gguf_string_or_array_past_the_end_is_truncated(tmp_path, body):
    """Within the limits but longer than the file: a truncated header, not a silent cut."""
    path = _gguf(tmp_path / "x.gguf", body)
    with pytest.raises(UserError) as info:
        GGUFFile(path)
    assert_one_line(info.value, path, "truncated GGUF header")


@pytest.mark.workflow
@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_crafted_header_sizes_stop_planning_with_one_line(tmp_path, kind):
    if kind == "safetensors":
        source = _hf_dir(tmp_path / "ckpt")
        _sparse_safetensors(source / "model.safetensors", 40 * GIB)
        fragment = "the safetensors header is 42949672960 bytes long"
    else:
        source = _gguf(tmp_path / "x.gguf",
                       _gguf_string(b"general.name") + struct.pack("<IQ", 8, 40 * GIB),
                       size=41 * GIB)
        fragment = "general.name: a string of 42949672960 bytes"
    line = _stops_planning(tmp_path / "run", _config_for(source))
    assert line.startswith("error: models.tiny.source: ") and fragment in line, line


# --- 2. shard names of a sharded index: inside the checkpoint directory only ---------------


def _sharded(tmp_path: Path, shard: str) -> Path:
    """A sharded checkpoint whose index puts one tensor in ``shard``; next to it, a directory
    ``other`` with a valid shard that must not be read."""
    from safetensors.numpy import save_file

    other = tmp_path / "other"
    other.mkdir()
    save_file({"x": np.zeros(2, dtype=np.float32)}, str(other / "model-00001.safetensors"))
    ckpt = _hf_dir(tmp_path / "ckpt")
    save_file({"y": np.zeros(2, dtype=np.float32)}, str(ckpt / "model-00002.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"y": "model-00002.safetensors", "x": shard}}))
    return ckpt


@pytest.mark.parametrize("shard", ["../other/model-00001.safetensors", "/etc/passwd",
                                   "sub/../../other/model-00001.safetensors", "."])
def test_shard_outside_the_checkpoint_is_refused(tmp_path, shard):
    ckpt = _sharded(tmp_path, shard)
    with pytest.raises(UserError) as info:
        directory_entries(ckpt)
    assert str(info.value) == (
        f"{ckpt / 'model.safetensors.index.json'}: weight_map entry x names shard {shard!r},"
        f" which is not a file name inside the checkpoint directory {ckpt} (allowed: a path"
        " relative to it, without '..')")


@pytest.mark.parametrize("shard", ["../other/model-00001.safetensors", "/etc/passwd"])
def test_shard_outside_a_cached_hub_snapshot_is_refused(tmp_path, monkeypatch, shard):
    """The hub cache's completeness check and the download rule take shard names from the
    same index: they are refused there too (nothing is looked up or fetched)."""
    from conftest import hub_cache
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    index = json.dumps({"weight_map": {"x": shard}})
    hub_cache(tmp_path / "hf", "org/tiny", {"config.json": CONFIG_JSON,
                                            "model.safetensors.index.json": index})
    for call in (hub.resolve, hub.download):
        with pytest.raises(UserError) as info:
            call("org/tiny")
        assert_one_line(info.value, f"weight_map entry x names shard {shard!r}")


@pytest.mark.workflow
def test_shard_outside_the_checkpoint_stops_planning(tmp_path):
    ckpt = _sharded(tmp_path, "../other/model-00001.safetensors")
    line = _stops_planning(tmp_path / "run", _config_for(ckpt))
    assert "weight_map entry x names shard '../other/model-00001.safetensors'" in line, line


# --- 3. ids that are neither a path nor a valid hub id -------------------------------------


@pytest.mark.parametrize("source", ["ckpts/llama 3", "a/..", "someorg/..%2F.."])
def test_invalid_hub_id_is_one_line(tmp_path, monkeypatch, source):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    for call in (open_checkpoint, hub.download):
        with pytest.raises(UserError) as info:
            call(source)
        assert str(info.value) == (
            f"source '{source}' is neither an existing path (resolved:"
            f" {os.path.abspath(source)}) nor a valid hub id (allowed: org/name of letters,"
            " digits, '-', '_' and '.', not starting or ending with '-' or '.', no '--' or"
            " '..', at most 96 characters)")


@pytest.mark.workflow
def test_invalid_hub_id_stops_planning(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    line = _stops_planning(tmp_path / "run", _config_for("ckpts/llama 3"), env=env)
    assert line.startswith("error: models.tiny.source: source 'ckpts/llama 3' is neither an"
                           " existing path"), line


# --- 4. a log that cannot be written: the error path degrades to the console ---------------

RULE_BODY = """
import sys
from weight_geometry.errors import UserError
from weight_geometry.rule_script import progress, run_rule

kind, log, out = sys.argv[1:]

def body():
    with open(out, "wb") as fh:
        if kind == "fill":      # the output fills the disk: ENOSPC
            while True:
                fh.write(bytes(1 << 16))
                fh.flush()
        fh.write(b"partial")
    if kind == "progress":      # the first line for the log finds the disk full
        progress("working")
    if kind == "user":
        raise UserError("top_k: 0 is not allowed")
    if kind == "bug":
        raise ValueError("boom")

run_rule(body, log, [out])
"""


def _run_rule(kind: str, log: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RULE_BODY, kind, str(log), str(out)],
                          capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def _mounted(path: Path, what: str, *mount_args: str):
    """``mount *mount_args path`` for the duration (skips the test, naming ``what``, where
    mounting is not allowed), unmounted lazily after."""
    proc = subprocess.run(["mount", *mount_args, str(path)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot {what} here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir()
    with _mounted(path, "mount a tmpfs", "-t", "tmpfs", "-o", f"size={size}", "tmpfs"):
        yield path


@pytest.mark.parametrize(("kind", "expected"), [
    ("user", "error: top_k: 0 is not allowed; the log {log} could not be written either"
             " (No space left on device)"),
    ("bug", "error: unexpected ValueError: boom (no traceback: the log {log} could not be"
            " written: No space left on device)"),
    ("progress", "error: No space left on device; the log {log} could not be written either"
                 " (No space left on device)"),
])
def test_log_on_a_full_device_gives_one_line(tmp_path, kind, expected):
    """/dev/full takes the log: every write to it fails with ENOSPC, as on a full disk. The
    error path used to print three or four chained tracebacks and no ``error:`` line."""
    log, out = Path("/dev/full"), tmp_path / "out.npy"
    if not os.access(log, os.W_OK):
        pytest.skip("no writable /dev/full")
    proc = _run_rule(kind, log, out)
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr == expected.format(log=log) + "\n", proc.stderr
    assert proc.stdout == ""


def test_full_disk_for_outputs_and_log_gives_one_line(tmp_path):
    """The issue's case: 400 KiB left, the job's output fills them, then its log cannot take
    the error either."""
    with _tmpfs(tmp_path / "disk", "400k") as disk:
        log, out = disk / "logs" / "rule.log", disk / "out.npy"
        proc = _run_rule("fill", log, out)
        assert proc.returncode == 1 and not out.exists(), proc.stderr
        assert proc.stderr == (f"error: No space left on device; the log {log} could not be"
                               " written either (No space left on device)\n"), proc.stderr


def test_unopenable_log_gives_one_line(tmp_path):
    """A log whose directory cannot be made (a file is in the way): one line, no traceback."""
    (tmp_path / "logs").write_text("a file, not a directory")
    log, out = tmp_path / "logs" / "model" / "rule.log", tmp_path / "out.npy"
    proc = _run_rule("user", log, out)
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr == f"error: the job's log {log} cannot be written (Not a directory)\n"


# --- 5. the same key twice in a YAML config file -----------------------------------------

DUPLICATE_MODEL = """\
models:
  tiny:
    source: {first}
  tiny:
    source: {second}
top_k: 4
"""


def test_duplicate_keys_in_a_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(DUPLICATE_MODEL.format(first="/a", second="/b"))
    with pytest.raises(UserError) as info:
        user_models({}, [path])
    assert str(info.value) == (f"{path}: key 'tiny' appears twice in models (lines 2 and 4;"
                               " allowed: each key once)")
    path.write_text("top_k: 4\nmodels: {a: {source: /m}}\ntop_k: 8\n")
    with pytest.raises(UserError) as info:
        user_models({}, [path])
    assert str(info.value) == (f"{path}: key 'top_k' appears twice (lines 1 and 3; allowed:"
                               " each key once)")


@pytest.mark.workflow
def test_duplicate_model_name_stops_planning(tmp_path, tiny_checkpoint):
    """A dry run, so that the old behaviour (the last entry silently wins) shows as a planned
    run instead of a whole one; the check is the same in a real run."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    cfg = workdir / "c.yaml"
    cfg.write_text(DUPLICATE_MODEL.format(first=tmp_path / "nope", second=tiny_checkpoint))
    line = _stops_planning(workdir, None, "-n", "--configfile", str(cfg))
    assert line == f"error: {cfg}: key 'tiny' appears twice in models (lines 2 and 4; allowed:" \
                   " each key once)"


# --- 6. model names that Snakemake or the file system cannot take --------------------------

LONG_NAME = (string.ascii_letters * 6)[:300]   # 300 characters, no repetition Snakemake sees


@pytest.mark.parametrize(("name", "expected"), [
    ("m" * 300, "300 characters (allowed: at most 100)"),
    (LONG_NAME, "300 characters (allowed: at most 100)"),
    ("m" * 20, "ends in 'm' repeated 20 times, which Snakemake takes for a cyclic dependency"),
    ("run-" + "ab" * 25, "ends in 'ab' repeated 25 times, which Snakemake takes for a cyclic"
                         " dependency"),
])
def test_model_name_too_long_or_periodic(name, expected):
    with pytest.raises(UserError) as info:
        build_plan({}, {name: {"source": "/m"}})
    assert_one_line(info.value, f"models: name {name!r} is not allowed", expected)


@pytest.mark.parametrize("name", ["m" * 19, LONG_NAME[:100], "qwen2.5-3b-instruct-" + "x" * 19])
def test_model_names_just_inside_the_limits_pass_the_name_check(name):
    with pytest.raises(UserError) as info:     # stops at the source, past the name
        build_plan({}, {name: {"source": "/nope"}})
    assert f"models.{name}.source" in str(info.value)


@pytest.mark.workflow
@pytest.mark.parametrize("name", ["m" * 300, LONG_NAME])
def test_bad_model_name_stops_planning(tmp_path, tiny_checkpoint, name):
    """``m`` x 300 stopped with Snakemake's PeriodicWildcardError, the other 300 characters
    with "File name too long" in the first job."""
    line = _stops_planning(tmp_path / "run", _config_for(tiny_checkpoint, name=name))
    assert line.startswith(f"error: models: name {name!r} is not allowed"), line


# --- 7. an existing output directory this run cannot write ---------------------------------


@contextlib.contextmanager
def _read_only(path: Path):
    """``path`` made read-only for this process: a read-only bind mount onto itself where the
    test may mount (root: file modes do not stop root), else mode 0o555."""
    if os.geteuid() == 0:
        with _mounted(path, "bind-mount read-only", "--bind", "-o", "ro", str(path)):
            yield path
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


@pytest.mark.workflow
@pytest.mark.parametrize(("directory", "stale", "args"), [
    # a log of a job that must run again: Snakemake's traceback from remove_existing_output
    ("logs/tiny", "model_info.log", ("--forcerun", "model_info")),
    # outputs to be made in an existing read-only directory
    ("results/tiny", None, ()),
])
def test_read_only_output_directory_stops_before_any_job(tmp_path, tiny_checkpoint, directory,
                                                         stale, args):
    """(An existing output that must be made again in a read-only directory is stopped by
    Snakemake itself, while it builds the DAG: "Write-protected output files".)"""
    workdir = tmp_path / "run"
    (workdir / directory).mkdir(parents=True)
    if stale:
        (workdir / directory / stale).write_text("old")
    before = sorted(workdir.rglob("*"))
    with _read_only(workdir / directory):
        proc = run_snakemake(workdir, *args, config=_config_for(tiny_checkpoint))
    line = error_line(proc)
    assert proc.returncode == 1
    why = "read-only file system" if os.geteuid() == 0 else "no write permission"
    assert line.startswith(f"error: {directory} is not writable ({why}); this run writes"
                           f" {directory}/"), line
    assert line.endswith(" in it (allowed: a directory this user may write)"), line
    after = {p for p in workdir.rglob("*") if ".snakemake" not in p.parts}
    assert after - {workdir / "config.yaml"} == set(before)
    if stale:
        assert (workdir / directory / stale).read_text() == "old"


def test_writable_check_names_the_first_directory_it_cannot_write(tmp_path):
    from weight_geometry.results_io import unwritable_directory

    (tmp_path / "results" / "a").mkdir(parents=True)
    (tmp_path / "results" / "ro").mkdir()
    outputs = [tmp_path / "results/a/x.npy", tmp_path / "results/ro/b/c/y.npy"]
    assert unwritable_directory(outputs) is None
    with _read_only(tmp_path / "results" / "ro"):
        found = unwritable_directory(outputs)
    assert found is not None
    directory, reason, output = found
    assert (directory, output) == (tmp_path / "results" / "ro", outputs[1])
    assert reason in ("read-only file system", "no write permission")


# --- 8. a tampered .npy among the results -------------------------------------------------


def _object_npy(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array([{"not": "numbers"}, None], dtype=object), allow_pickle=True)
    return path


def test_tampered_npy_is_named_with_the_way_out(tmp_path):
    from weight_geometry.results_io import load_array

    vectors = _object_npy(tmp_path / "bases" / "layers000-001" / "vectors.npy")
    similarity = _object_npy(tmp_path / "k4" / "similarity_head0.npy")
    for bad, load in ((vectors, load_array), (vectors, lambda p: load_layers([p])),
                      (similarity, lambda p: load_similarities([p]))):
        with pytest.raises(UserError) as info:
            load(bad)
        assert str(info.value) == (
            f"{bad}: not a plain numeric array (it holds Python objects, which are never"
            " unpickled); delete it and run again: the rule that writes it runs again")
    garbage = tmp_path / "similarity_head0.npy"
    garbage.write_bytes(b"\x80\x04not an npy file at all")
    with pytest.raises(UserError) as info:
        load_array(garbage)
    assert_one_line(info.value, garbage, "not a plain numeric array", "delete it")


@pytest.mark.workflow
def test_tampered_npy_fails_its_reader_with_one_line(tmp_path, tiny_checkpoint):
    """The similarity files exist (one tampered) and only the rule that averages them may run."""
    workdir = tmp_path / "run"
    kdir = workdir / "results" / "tiny" / "k4"
    _object_npy(kdir / "similarity_head0.npy")
    np.save(kdir / "similarity_head1.npy", np.eye(4))
    config = _config_for(tiny_checkpoint, heads=[0, 1])
    proc = run_snakemake(workdir, "results/tiny/k4/similarity_mean.npy", "--allowed-rules",
                         "similarity_mean", config=config)
    assert proc.returncode == 1
    line = ("error: results/tiny/k4/similarity_head0.npy: not a plain numeric array (it holds"
            " Python objects, which are never unpickled); delete it and run again: the rule"
            " that writes it runs again")
    assert line in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in kdir.rglob("*") if p.is_file()) == [
        "similarity_head0.npy", "similarity_head1.npy"]     # no similarity_mean.npy


# --- 9. a symlink loop where the weights should be ----------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json"])
def test_symlink_loop_is_named(tmp_path, name):
    ckpt = _hf_dir(tmp_path / "ckpt")
    (ckpt / name).symlink_to(ckpt / "loop")
    (ckpt / "loop").symlink_to(ckpt / name)
    with pytest.raises(UserError) as info:
        directory_entries(ckpt)
    assert str(info.value) == (f"{ckpt / name}: a symlink loop (allowed: a file, or a symlink"
                               " to one)")


def test_dangling_symlink_is_named(tmp_path):
    ckpt = _hf_dir(tmp_path / "ckpt")
    (ckpt / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(UserError) as info:
        directory_entries(ckpt)
    assert str(info.value) == (f"{ckpt / 'model.safetensors'}: a symlink to"
                               f" {tmp_path / 'gone.safetensors'}, which does not exist")


@pytest.mark.workflow
def test_symlink_loop_stops_planning(tmp_path):
    ckpt = _hf_dir(tmp_path / "ckpt")
    (ckpt / "model.safetensors").symlink_to("model.safetensors")
    line = _stops_planning(tmp_path / "run", _config_for(ckpt))
    assert line == (f"error: models.tiny.source: {ckpt / 'model.safetensors'}: a symlink loop"
                    " (allowed: a file, or a symlink to one)")


# --- what held, kept: no pickle, no torch.load, no remote code, no shell -----------------


def test_no_pickle_no_remote_code_no_shell():
    """The workflow reads checkpoints and results without unpickling and runs no shell."""
    repo = Path(__file__).resolve().parents[1]
    files = [*repo.glob("src/**/*.py"), *repo.glob("workflow/**/*.py"),
             *repo.glob("workflow/**/*.smk"), repo / "Snakefile"]
    assert len(files) > 20
    for pattern in ("allow_pickle=True", "torch.load", "trust_remote_code", "shell=True",
                    "import pickle", "pd.read_pickle"):
        hits = [f for f in files if pattern in f.read_text()]
        assert not hits, f"{pattern} in {hits}"
