"""open_checkpoint on hand-written Hugging Face directories: dims, validation, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line
from safetensors.torch import save_file

from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError

CONFIG = {"model_type": "qwen2", "hidden_size": 24, "intermediate_size": 40,
          "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1}
SUFFIX = {"W_Q": "self_attn.q_proj", "W_K": "self_attn.k_proj", "W_V": "self_attn.v_proj",
          "W_O": "self_attn.o_proj", "W_gate": "mlp.gate_proj", "W_up": "mlp.up_proj",
          "W_down": "mlp.down_proj"}


def _shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dh = cfg.get("head_dim") or d // h
    return {"W_Q": (h * dh, d), "W_K": (kv * dh, d), "W_V": (kv * dh, d), "W_O": (d, h * dh),
            "W_gate": (ff, d), "W_up": (ff, d), "W_down": (d, ff)}


def _write(path, cfg=CONFIG, tweak=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for wt, shape in _shapes(cfg).items():
            tensors[f"model.layers.{layer}.{SUFFIX[wt]}.weight"] = torch.randn(*shape,
                                                                                generator=g)
    tensors["model.embed_tokens.weight"] = torch.randn(10, cfg["hidden_size"], generator=g)
    if tweak:
        tweak(tensors)
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def test_open_hf_dir_dims_and_read(tmp_path):
    tensors = _write(tmp_path / "m")
    ckpt = open_checkpoint(str(tmp_path / "m"))
    assert ckpt.format == "safetensors" and ckpt.architecture == "qwen2"
    d = ckpt.dims
    assert (d.n_layers, d.d_model, d.d_ff, d.n_heads, d.n_kv_heads, d.d_head) == \
        (2, 24, 40, 3, 1, 8)
    np.testing.assert_array_equal(ckpt.read_layer(1)["W_K"],
                                  tensors["model.layers.1.self_attn.k_proj.weight"].numpy())


def test_describe_records_the_configured_source(tmp_path):
    """A job opens the path its source resolved to at planning; model.json records the source
    as configured (a hub id, pypi:...) when it is given, else what was opened."""
    _write(tmp_path / "m")
    path = str(tmp_path / "m")
    record = open_checkpoint(path, configured_source="acme/tiny").describe()
    assert (record["source"], record["path"]) == ("acme/tiny", path)
    assert list(record)[:2] == ["source", "path"]
    assert open_checkpoint(path).describe()["source"] == path


def test_explicit_head_dim_wins(tmp_path):
    cfg = {**CONFIG, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 10}
    _write(tmp_path / "m", cfg)
    assert open_checkpoint(str(tmp_path / "m")).dims.d_head == 10     # not 24 // 4 = 6


def test_nan_weight_is_user_error(tmp_path):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")

    _write(tmp_path / "m", tweak=poison)
    ckpt = open_checkpoint(str(tmp_path / "m"))
    ckpt.read_layer(0)["W_up"]
    with pytest.raises(UserError) as info:
        ckpt.read_layer(1)["W_up"]
    assert_one_line(info.value, "model.layers.1.mlp.up_proj.weight", "model.safetensors")


def test_wrong_shape_and_missing_tensor(tmp_path):
    def reshape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 24)

    _write(tmp_path / "a", tweak=reshape)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "a"))
    assert_one_line(info.value, "model.layers.0.self_attn.k_proj.weight", "(16, 24)", "(8, 24)")

    def drop(t):
        del t["model.layers.1.mlp.down_proj.weight"]

    _write(tmp_path / "b", tweak=drop)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "b"))
    assert_one_line(info.value, "model.layers.1.mlp.down_proj.weight")


def test_bad_sources(tmp_path):
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "nope"))
    assert_one_line(info.value, "nope")
    _write(tmp_path / "mamba", {**CONFIG, "model_type": "mamba"})
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "mamba"))
    assert_one_line(info.value, "mamba", "llama")
    with pytest.raises(UserError) as info:
        open_checkpoint("pypi:surely-not-an-installed-package-xyz")
    assert_one_line(info.value, "surely-not-an-installed-package-xyz")
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"0" * 64)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(txt))
    assert_one_line(info.value, "weights.bin")
    with pytest.raises(UserError) as info:
        open_checkpoint("~no-such-user-xyz/model")
    assert_one_line(info.value, "source '~no-such-user-xyz/model'", "existing user")


def test_missing_relative_source_is_shown_resolved(tmp_path, monkeypatch):
    """A relative path (or ~) is shown as written and as resolved against the working directory
    (Snakemake's -d); an absolute one only as written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for source, resolved in [("ckpt/x/m.gguf", tmp_path / "ckpt/x/m.gguf"),
                             ("~/m.gguf", tmp_path / "home/m.gguf")]:
        with pytest.raises(UserError) as info:
            open_checkpoint(source)
        assert_one_line(info.value,
                        f"source '{source}' does not exist (resolved: {resolved}); allowed:")
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "nope"))
    assert_one_line(info.value, f"source '{tmp_path / 'nope'}' does not exist; allowed:")


def _write_with_norms(path, model_type: str, qk_norm: bool):
    """A 2-layer checkpoint (square W_Q: 3 heads x 8 = d = 24) with random norm gains, distinct
    per layer; returns its tensors."""
    cfg = {**CONFIG, "model_type": model_type, "head_dim": 8}

    def add_norms(t):
        g = torch.Generator().manual_seed(7)
        for layer in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            t[p + "input_layernorm.weight"] = torch.rand(24, generator=g) + 0.5
            t[p + "post_attention_layernorm.weight"] = torch.rand(24, generator=g) + 0.5
            if qk_norm:
                t[p + "self_attn.q_norm.weight"] = torch.rand(8, generator=g) + 0.5
                t[p + "self_attn.k_norm.weight"] = torch.rand(8, generator=g) + 0.5

    return {n: t.numpy() for n, t in _write(path, cfg, tweak=add_norms).items()}


@pytest.mark.parametrize("model_type,qk_norm,offset", [("qwen3", True, 0.0),
                                                       ("gemma", False, 1.0)])
def test_fold_norms_scales_columns_and_head_rows(tmp_path, model_type, qk_norm, offset):
    """W diag(g_attn) for Q/K/V, W diag(g_ffn) for gate/up, each head's rows times the QK-norm
    gain (qwen3), gains + 1 for gemma; W_O, W_down as stored. Built element by element."""
    t = _write_with_norms(tmp_path / "m", model_type, qk_norm)
    ckpt = open_checkpoint(str(tmp_path / "m"), fold_norms=True)
    for layer in range(2):
        p = f"model.layers.{layer}."
        attn = t[p + "input_layernorm.weight"] + offset
        ffn = t[p + "post_attention_layernorm.weight"] + offset
        rows = {"W_Q": np.ones(24), "W_K": np.ones(8)}
        if qk_norm:   # row r of W_Q/W_K is dimension r % d_head of its head
            rows = {"W_Q": np.tile(t[p + "self_attn.q_norm.weight"], 3),
                    "W_K": t[p + "self_attn.k_norm.weight"]}
        cols = {"W_Q": attn, "W_K": attn, "W_V": attn, "W_gate": ffn, "W_up": ffn}
        got = ckpt.read_layer(layer, fold_norms=True)
        raw = ckpt.read_layer(layer)
        for wt, suffix in SUFFIX.items():
            w = t[f"{p}{suffix}.weight"]
            expected = w.copy()
            for r in range(w.shape[0]):
                for c in range(w.shape[1]):
                    expected[r, c] = (w[r, c] * rows.get(wt, np.ones(w.shape[0]))[r]
                                      * cols.get(wt, np.ones(w.shape[1]))[c])
            np.testing.assert_allclose(got[wt], expected, rtol=1e-6, atol=0,
                                       err_msg=f"{wt} layer {layer}")
            np.testing.assert_array_equal(raw[wt], w)


def test_inf_weight_is_user_error(tmp_path):
    def poison(t):
        t["model.layers.0.self_attn.o_proj.weight"][2, 1] = float("inf")

    _write(tmp_path / "m", tweak=poison)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "m")).read_layer(0)
    assert_one_line(info.value, "model.layers.0.self_attn.o_proj.weight", "NaN or Inf")


def test_undecodable_dtype_fails_at_open(tmp_path):
    """An integer tensor of the right shape: open (headers only) already stops."""
    def to_int(t):
        t["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(40, 24, dtype=torch.int8)

    _write(tmp_path / "m", tweak=to_int)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "m"))
    assert_one_line(info.value, "model.layers.1.mlp.gate_proj.weight", "dtype I8")


def test_tensors_of_a_layer_past_the_layer_count(tmp_path):
    """config.json says 2 layers, the file holds 3: refused (it used to plan a complete report
    of 2 layers), naming the first weight of the extra layer and the key."""
    tensors = _write(tmp_path / "m", {**CONFIG, "num_hidden_layers": 3})
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))
    assert "model.layers.2.self_attn.q_proj.weight" in tensors
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "m"))
    assert_one_line(info.value, str(tmp_path / "m" / "model.safetensors"),
              "tensor model.layers.2.self_attn.q_proj.weight is of layer 2",
              "config.json num_hidden_layers = 2", "layers 0..1")


def test_other_tensors_past_the_layer_count_are_not_weights(tmp_path):
    """Only the adapter's per-layer weight names count: a norm or bias of layer 2, or an
    unrelated name with a layer number, does not stop a 2-layer model."""
    def add(t):
        t["model.layers.2.input_layernorm.weight"] = torch.ones(24)
        t["model.layers.2.self_attn.q_proj.bias"] = torch.ones(24)
        t["model.layers.2.self_attn.q_proj.weight.extra"] = torch.ones(24)

    _write(tmp_path / "m", tweak=add)
    assert open_checkpoint(str(tmp_path / "m")).dims.n_layers == 2
