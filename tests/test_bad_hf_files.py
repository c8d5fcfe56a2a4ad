"""Malformed Hugging Face files (config.json, safetensors headers, the shard index) and hub
caches without the weights: one-line UserErrors naming the file and the value, never a
traceback; offline, a hub id whose weights are not cached stops the dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_LLAMA, assert_one_line, error_line, hub_cache, run_snakemake

from weight_geometry import hub
from weight_geometry.architectures import dims_from_hf_config
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError

CONFIG = {**TINY_LLAMA, "model_type": "llama"}
DROP = object()  # a config key to remove
REPO_ID = "org/tiny"
COMMIT = "a" * 40


def _config_text(**changes) -> str:
    config = {**CONFIG, **changes}
    return json.dumps({k: v for k, v in config.items() if v is not DROP})


@pytest.mark.parametrize(("text", "fragments"), [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["[1, 2]", "not a JSON object"]),
    ('"abc"', ['"abc"', "not a JSON object"]),
    (_config_text(hidden_size="abc"), ["hidden_size: 'abc' is not allowed", "integer >= 1"]),
    (_config_text(hidden_size=None), ["hidden_size: None is not allowed"]),
    (_config_text(num_attention_heads=0, head_dim=DROP), ["num_attention_heads: 0"]),
    (_config_text(num_hidden_layers=2.5), ["num_hidden_layers: 2.5", "integer >= 1"]),
    (_config_text(num_hidden_layers=True), ["num_hidden_layers: True"]),
    (_config_text(num_key_value_heads=0), ["num_key_value_heads: 0"]),
    (_config_text(num_key_value_heads=3),
     ["num_attention_heads=4 is not a multiple of num_key_value_heads=3",
      "allowed: num_key_value_heads a divisor of 4"]),
    (_config_text(hidden_size=100, num_attention_heads=3, num_key_value_heads=1, head_dim=DROP),
     ["hidden_size=100 is not divisible by num_attention_heads=3 and the config has no head_dim",
      "allowed: hidden_size a multiple of num_attention_heads, or a head_dim"]),
    (_config_text(intermediate_size=DROP), ["no intermediate_size"]),
    (_config_text(model_type=DROP), ["no model_type", "supported:", "llama"]),
    (_config_text(model_type="mamba"), ["'mamba' is not supported", "llama"]),
])
def test_bad_config_json(tmp_path, text, fragments):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path))
    assert_one_line(info.value, tmp_path / "config.json", *fragments)


def test_optional_dims_may_be_null():
    """head_dim, num_key_value_heads (and GPT-2's n_inner) null: the defaults, as HF has it."""
    dims = dims_from_hf_config({**CONFIG, "head_dim": None, "num_key_value_heads": None})
    assert (dims.n_heads, dims.n_kv_heads, dims.d_head) == (4, 4, 16)
    gpt2 = dims_from_hf_config({"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 2,
                                "n_inner": None})
    assert (gpt2.d_ff, gpt2.d_head) == (128, 8)


def test_gpt2_width_not_divisible_by_heads():
    """GPT-2 has no head_dim: n_embd must split evenly over n_head (d_head was 33, and the
    checkpoint's shapes then contradicted it)."""
    with pytest.raises(UserError) as info:
        dims_from_hf_config({"model_type": "gpt2", "n_embd": 100, "n_head": 3, "n_layer": 2})
    assert str(info.value) == ("n_embd=100 is not divisible by n_head=3 (allowed: n_embd a"
                               " multiple of n_head)")


def _header(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize(("content", "fragments"), [
    (b"", ["file is 0 bytes, shorter than the 8-byte header length"]),
    (b"abcd", ["file is 4 bytes, shorter than the 8-byte header length"]),
    ((5).to_bytes(8, "little") + b"{nope", ["safetensors header is not valid JSON"]),
    (_header([1, 2]), ["safetensors header is [1, 2], not a JSON object"]),
    (_header({"x": {"dtype": "F32", "shape": [1]}}),
     ["tensor x is", '"shape": [1]', "data_offsets"]),
    (_header({"x": 5}), ["tensor x is 5", "data_offsets"]),
    (_header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}) + bytes(4),
     ['"data_offsets": [4, 0]']),
    (_header({"x": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 4]}}) + bytes(4),
     ['"shape": "ab"']),
    (None, ["cannot be read (Is a directory)"]),  # model.safetensors is a directory
])
def test_bad_safetensors_file(tmp_path, content, fragments):
    (tmp_path / "config.json").write_text(_config_text())
    weights = tmp_path / "model.safetensors"
    if content is None:
        weights.mkdir()
    else:
        weights.write_bytes(content)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path))
    assert_one_line(info.value, weights, *fragments)


BAD_INDEXES = [
    ("{nope", ["not valid JSON"]),
    ("[]", ["the file is [], not a JSON object"]),
    ("{}", ["weight_map is missing", "shard file names"]),
    ('{"weight_map": []}', ["weight_map is []"]),
    ('{"weight_map": {"x": 3}}', ['weight_map is {"x": 3}']),
    (None, ["cannot be read (Is a directory)"]),  # the index is a directory
]


def _write_index(directory: Path, text: str | None) -> Path:
    index = directory / "model.safetensors.index.json"
    if text is None:
        index.mkdir(parents=True)
    else:
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text(text)
    return index


@pytest.mark.parametrize(("text", "fragments"), BAD_INDEXES)
def test_bad_index(tmp_path, text, fragments):
    (tmp_path / "config.json").write_text(_config_text())
    index = _write_index(tmp_path, text)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path))
    assert_one_line(info.value, index, *fragments)


def _hub_cache(hf_home: Path) -> Path:
    """An HF cache (``HF_HOME``) holding config.json of REPO_ID (refs/main -> COMMIT) and no
    weights; returns the snapshot directory."""
    return hub_cache(hf_home, REPO_ID, {"config.json": _config_text()}, COMMIT)


def _use_hub_cache(hf_home: Path, monkeypatch, offline: bool) -> Path:
    """:func:`_hub_cache`, used by huggingface_hub in this process (online or not)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    return _hub_cache(hf_home)


@pytest.mark.parametrize("sharded", [False, True])
def test_offline_cache_without_weights(tmp_path, monkeypatch, sharded):
    """Offline, config.json cached without (all) the weights: planning stops, and so would the
    download job."""
    snapshot = _use_hub_cache(tmp_path, monkeypatch, offline=True)
    if sharded:
        _write_index(snapshot, json.dumps({"weight_map": {"x": "model-00001.safetensors"}}))
    with pytest.raises(UserError) as info:
        hub.resolve(REPO_ID)
    assert_one_line(info.value, snapshot, f"'{REPO_ID}'", "not all its safetensors weights",
                     "HF_HUB_OFFLINE is set", "snakemake download")
    assert "local path" not in str(info.value)     # a cached hub id is no path typo
    with pytest.raises(UserError) as info:
        hub.download(REPO_ID)
    missing = "model-00001.safetensors" if sharded else "model.safetensors"
    assert_one_line(info.value, Path(REPO_ID), f"{missing} is not in the local Hugging Face"
                     " cache", "HF_HUB_OFFLINE is set")


@pytest.mark.parametrize(("text", "fragments"), BAD_INDEXES)
def test_bad_index_in_hub_cache(tmp_path, monkeypatch, text, fragments):
    snapshot = _use_hub_cache(tmp_path, monkeypatch, offline=False)
    index = _write_index(snapshot, text)
    with pytest.raises(UserError) as info:
        hub.cache_state(REPO_ID)
    assert_one_line(info.value, index, *fragments)


def test_download_hub_error_is_one_line(tmp_path, monkeypatch):
    """Online, any huggingface_hub error (here: the network is down) is one line naming the
    repo, the file and the error's first sentence, not its multi-line text."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    _use_hub_cache(tmp_path, monkeypatch, offline=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # resolves, refuses

    def unreachable(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on"
                                      " the Hub. Please check your connection.\nMore lines.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(UserError) as info:
        hub.download(REPO_ID)
    assert_one_line(info.value, Path(REPO_ID), "cannot fetch config.json",
                     "(LocalEntryNotFoundError: An error happened while trying to locate the"
                     " file on the Hub)")


NO_PROXY_ENV = {f"{name}_proxy": "" for name in ("http", "https", "all")}
NO_PROXY_ENV |= {key.upper(): "" for key in NO_PROXY_ENV}


def _no_dns(monkeypatch, tmp_path, endpoint: str = "https://hub.example") -> None:
    """Online (HF_HUB_OFFLINE unset), no proxy, the cache in ``tmp_path/hf``, and no address
    for any host (a ``getaddrinfo`` that fails as a machine without DNS does)."""
    import socket

    from huggingface_hub import constants

    def no_address(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for key, value in NO_PROXY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(socket, "getaddrinfo", no_address)


@pytest.mark.parametrize("fetch", [hub.resolve, hub.download])
def test_unresolvable_hub_host_fails_at_once(tmp_path, monkeypatch, fetch):
    """No DNS for the hub's host, nothing cached: one line naming the host, without calling
    huggingface_hub (whose five retries printed "Retrying in ..." for about 25 s first)."""
    import huggingface_hub

    _no_dns(monkeypatch, tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", pytest.fail)
    with pytest.raises(UserError) as info:
        fetch(REPO_ID)
    assert_one_line(info.value, Path(REPO_ID), "cannot fetch config.json",
                     "the hub's host hub.example does not resolve", "HF_HUB_OFFLINE=1")


def test_unresolvable_hub_host_with_weights_missing_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    _no_dns(monkeypatch, tmp_path)
    _hub_cache(tmp_path / "hf")                  # config.json, no weights
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", pytest.fail)
    assert not hub.resolve(REPO_ID).complete    # planning needs only the cached config.json
    with pytest.raises(UserError) as info:
        hub.download(REPO_ID)
    assert_one_line(info.value, Path(REPO_ID), "cannot fetch its safetensors weights",
                     "does not resolve")


def test_unresolvable_hub_host_with_everything_cached_uses_the_cache(tmp_path, monkeypatch):
    """A compute node with a filled HF_HOME, no DNS and HF_HUB_OFFLINE unset: the download
    rule reads the cache without asking the hub (as HF_HUB_OFFLINE=1 would), no error."""
    import huggingface_hub

    _no_dns(monkeypatch, tmp_path)
    snapshot = _hub_cache(tmp_path / "hf")
    (snapshot / "model.safetensors").write_bytes(b"")
    calls = []

    def from_cache(repo_id, filename, local_files_only=False, **kwargs):
        calls.append((filename, local_files_only))
        if filename == "model.safetensors.index.json":
            from huggingface_hub.errors import EntryNotFoundError
            raise EntryNotFoundError("not in this repo")
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    files = hub.download(REPO_ID)
    assert [f.name for f in files] == ["config.json", "model.safetensors"]
    assert calls and all(local for _, local in calls), calls


@pytest.mark.parametrize(("endpoint", "proxy", "no_proxy", "looked_up"), [
    ("https://hub.example", "HTTPS_PROXY", "", False),
    ("http://mirror.example", "HTTP_PROXY", "", False),    # the endpoint's own scheme counts
    ("https://hub.example", "ALL_PROXY", "", False),
    ("http://mirror.example", "HTTPS_PROXY", "", True),    # a proxy for another scheme
    ("https://hub.example", "HTTPS_PROXY", "hub.example", True),  # bypassed by no_proxy
])
def test_a_proxy_that_serves_the_endpoint_skips_the_lookup(tmp_path, monkeypatch, endpoint,
                                                           proxy, no_proxy, looked_up):
    """A proxy resolves the hub's host itself, so without local DNS the check must not refuse
    it; where the proxy is not used for the endpoint, the host is looked up here."""
    _no_dns(monkeypatch, tmp_path, endpoint)
    for key in (proxy, proxy.lower()):  # urllib lets an empty lower-case one cancel it
        monkeypatch.setenv(key, "http://proxy.example:3128")
    for key in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(key, no_proxy)
    reason = hub.unresolvable_endpoint()
    assert (reason is not None) == looked_up, reason


@pytest.mark.parametrize("online", [False, True])
def test_path_typo_that_looks_like_a_hub_id(tmp_path, monkeypatch, online):
    """``rb/llama`` (meant: a local directory) is no path here, so it is tried as a hub id;
    when that fails, the one line also says that no such local path exists, resolved against
    the working directory (it used to name the hub alone)."""
    if online:
        _no_dns(monkeypatch, tmp_path)
    else:
        _use_hub_cache(tmp_path / "hf", monkeypatch, offline=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        open_checkpoint("rb/llama")
    assert_one_line(info.value, Path("rb/llama"), "source 'rb/llama'",
                     f"; no local path {tmp_path / 'rb' / 'llama'} exists either")


@pytest.mark.workflow
def test_dry_run_with_unresolvable_hub_stops_without_retries(tmp_path):
    config = {"models": {"tiny": {"source": REPO_ID}}, "device": "cpu", "top_k": 4}
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": "https://hub.invalid", **NO_PROXY_ENV}
    proc = run_snakemake(tmp_path / "run", "-n", config=config, env=env)
    line = error_line(proc)
    assert "the hub's host hub.invalid does not resolve" in line, line
    assert "Retrying" not in proc.stdout + proc.stderr


@pytest.mark.workflow
def test_dry_run_offline_hub_id_without_weights(tmp_path):
    """The dry run used to succeed here and the download job to fail with pages of
    huggingface_hub tracebacks; now planning stops with the one line."""
    _hub_cache(tmp_path / "hf")
    config = {"models": {"tiny": {"source": REPO_ID}}, "device": "cpu", "top_k": 4}
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    line = error_line(run_snakemake(tmp_path / "run", "-n", config=config, env=env))
    for part in ["models.tiny.source", f"'{REPO_ID}'", "not all its safetensors weights",
                 "HF_HUB_OFFLINE is set"]:
        assert part in line, line


@pytest.mark.workflow
@pytest.mark.parametrize("dtype", ["int8", "int64"])
def test_dry_run_stops_at_an_undecodable_dtype(tmp_path, tiny_checkpoint, dtype):
    """An integer-typed projection (e.g. a quantized checkpoint's packed weights) used to pass
    planning and stop the extraction job; now the dry run names the tensor and the dtypes read."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.2.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(getattr(torch, dtype))
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    config = {"models": {"tiny": {"source": str(ckpt)}}, "device": "cpu", "top_k": 4}
    line = error_line(run_snakemake(tmp_path / "run", "-n", config=config))
    code = {"int8": "I8", "int64": "I64"}[dtype]
    for part in [str(ckpt / "model.safetensors"), f"tensor {name} has dtype {code}",
                 "readable: F64, F32, F16, BF16"]:
        assert part in line, line


@pytest.mark.workflow
def test_dry_run_stops_at_layers_past_num_hidden_layers(tmp_path, tiny_checkpoint):
    """config.json says 2 layers, the weights hold 4: this used to plan (and report) 2."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "config.json").write_text(_config_text(num_hidden_layers=2))
    config = {"models": {"tiny": {"source": str(ckpt)}}, "device": "cpu", "top_k": 4}
    line = error_line(run_snakemake(tmp_path / "run", "-n", config=config))
    assert line == (f"error: models.tiny.source: {ckpt / 'model.safetensors'}: tensor"
                    " model.layers.2.self_attn.q_proj.weight is of layer 2, but config.json"
                    " num_hidden_layers = 2 (allowed: weights of layers 0..1; the layer count"
                    " must cover every layer stored)")
    assert not (tmp_path / "run" / "results").exists()
