"""Layer kinds (full, sliding, chunked, nope, linear) against transformers' own attention
modules, and against llama.cpp's loader rules for GGUF metadata."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T

from weight_geometry.errors import UserError
from weight_geometry.gguf_file import MAX_KEPT_ARRAY, GGUFFile
from weight_geometry.layer_kinds import (
    LayerKinds,
    gguf_layer_kinds,
    hf_layer_kinds,
    position_caveat,
    with_layer_type,
)

SMALL = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**SMALL),
    "mistral": lambda: T.MistralConfig(**SMALL, sliding_window=16),
    "mistral-no-window": lambda: T.MistralConfig(**SMALL, sliding_window=None),
    "phi3": lambda: T.Phi3Config(**SMALL, sliding_window=16),
    "qwen2": lambda: T.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=16,
                                   max_window_layers=5),
    "qwen2-off": lambda: T.Qwen2Config(**SMALL, sliding_window=16, max_window_layers=5),
    "gemma2": lambda: T.Gemma2Config(**SMALL, head_dim=8, sliding_window=16),
    "gemma3_text": lambda: T.Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=16),
    "gemma3_text-pattern3": lambda: T.Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=16,
                                                       sliding_window_pattern=3),
    "gemma3": lambda: T.Gemma3Config(
        text_config=T.Gemma3TextConfig(**SMALL, head_dim=8, sliding_window=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4),
    "olmo3": lambda: T.Olmo3Config(**SMALL, sliding_window=16),
    "smollm3": lambda: T.SmolLM3Config(**SMALL),
    "smollm3-interval3": lambda: T.SmolLM3Config(**SMALL, no_rope_layer_interval=3),
    "smollm3-sliding": lambda: T.SmolLM3Config(**SMALL, use_sliding_window=True,
                                               sliding_window=16),
    "llama4_text": lambda: T.Llama4TextConfig(**SMALL, head_dim=8, num_local_experts=2,
                                              intermediate_size_mlp=48,
                                              attention_chunk_size=16),
    "llama4_text-unchunked": lambda: T.Llama4TextConfig(
        **SMALL, head_dim=8, num_local_experts=2, intermediate_size_mlp=48,
        attention_chunk_size=None),
    "gpt_oss": lambda: T.GptOssConfig(**SMALL, head_dim=8, num_local_experts=2,
                                      sliding_window=16),
    "qwen3": lambda: T.Qwen3Config(**SMALL, head_dim=8, use_sliding_window=True,
                                   sliding_window=16, max_window_layers=3),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**SMALL, num_experts=2, use_sliding_window=True,
                                          sliding_window=16, max_window_layers=5),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**SMALL, head_dim=8, num_experts=2,
                                          use_sliding_window=True, sliding_window=16),
    "mixtral": lambda: T.MixtralConfig(**SMALL, num_local_experts=2, sliding_window=16),
    "olmo3-no-window": lambda: T.Olmo3Config(**SMALL, sliding_window=None),
    "gemma4_text": lambda: T.Gemma4TextConfig(
        **SMALL, head_dim=8, global_head_dim=16, sliding_window=16,
        hidden_size_per_layer_input=4, vocab_size_per_layer_input=64),
}
#: Models whose attention takes ``config.sliding_window`` in every layer (no per-layer type).
EVERY_LAYER_WINDOW = ("mistral", "phi3", "mixtral")


def reference_kinds(model) -> list[str]:
    """Each decoder layer's kind as transformers' live attention module runs it: NoPE where
    the module skips RoPE (``use_rope`` 0), chunked where the model masks in chunks (Llama 4's
    ``chunked_attention`` layers), sliding where the module or the model (Mistral, Phi-3)
    passes a sliding window to the attention, else full."""
    cfg = model.config.get_text_config()
    base = model.model.language_model if hasattr(model.model, "language_model") else model.model
    kinds = []
    for layer, block in enumerate(base.layers):
        att = block.self_attn
        if getattr(att, "use_rope", 1) == 0:
            kinds.append("nope")
        elif getattr(cfg, "layer_types", None) and cfg.layer_types[layer] == "chunked_attention":
            kinds.append("chunked")
        elif getattr(att, "sliding_window", None) is not None or (
                cfg.model_type in EVERY_LAYER_WINDOW and cfg.sliding_window is not None):
            kinds.append("sliding")
        else:
            kinds.append("full")
    return kinds


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_layer_kinds_follow_transformers_modules(tmp_path, name):
    """From ``config.json`` as ``save_pretrained`` writes it, and with ``layer_types`` and
    ``no_rope_layers`` removed (older and published configs: transformers' defaults), every
    layer's kind is the one the live module runs."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name]())
    expected = reference_kinds(model)
    model.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    got = hf_layer_kinds(config, 8)
    assert list(got.kinds) == expected, name
    text = config.get("text_config", config)
    for key in ("layer_types", "no_rope_layers"):
        text.pop(key, None)
    assert list(hf_layer_kinds(config, 8).kinds) == expected, name
    cfg = model.config.get_text_config()
    window = (cfg.attention_chunk_size if "chunked" in expected else cfg.sliding_window
              if "sliding" in expected or name == "smollm3-sliding" else None)
    assert got.window == window, name


def test_kinds_seen_in_the_configs():
    """The table covers every kind but ``linear`` (the hybrids' own tests cover that one)."""
    seen = set()
    for config in CONFIGS.values():
        model = T.AutoModelForCausalLM.from_config(config())
        seen |= set(reference_kinds(model))
    assert seen == {"full", "sliding", "chunked", "nope"}


def test_hf_smollm3_sliding_nope_layers_keep_their_window():
    config = T.SmolLM3Config(**SMALL, use_sliding_window=True, sliding_window=16).to_dict()
    kinds = hf_layer_kinds(config, 8)
    assert kinds.layers("nope") == (3, 7) and kinds.window == 16
    assert position_caveat("smollm3", kinds).endswith(
        "NoPE layers (3, 7): exact, no position enters their score, over a window of 16 tokens")


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gemma2", "layer_types": ["sliding_attention"] * 3},
     "layer_types: 3 entries is not allowed (a list of one entry per layer, 4 layers)"),
    ({"model_type": "gemma2", "layer_types": ["sliding_attention", "mamba"] * 2},
     "layer_types: 'mamba' is not allowed (one of full_attention, sliding_attention,"
     " chunked_attention, linear_attention per layer)"),
    ({"model_type": "smollm3", "no_rope_layers": [1, 1, 2, 0]},
     "no_rope_layers: 2 is not allowed (1 for a RoPE layer, 0 for a NoPE layer)"),
    ({"model_type": "smollm3", "no_rope_layers": []},
     "no_rope_layers: 0 entries is not allowed (a list of one entry per layer, 4 layers)"),
    ({"model_type": "qwen3_next", "full_attention_interval": 0},
     "full_attention_interval: 0 is not allowed (an integer >= 1)"),
    ({"model_type": "smollm3", "no_rope_layer_interval": 0},
     "no_rope_layer_interval: 0 is not allowed (an integer >= 1)"),
    ({"model_type": "gemma3", "text_config": {"layer_types": "all"}},
     "text_config.layer_types: 'all' is not allowed (a list of one entry per layer, 4 layers)"),
])
def test_hf_bad_layer_kinds_are_one_line(config, message):
    with pytest.raises(UserError) as info:
        hf_layer_kinds(config, 4)
    assert str(info.value) == message


def llama_cpp_swa(n_pattern: int, n_layers: int) -> list[bool]:
    """llama.cpp's ``llama_hparams::set_swa_pattern``: layer ``il`` uses the window when
    ``il % n_pattern < n_pattern - 1`` (``n_pattern`` 0: every layer)."""
    return [n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layers)]


def kinds_from(swa: list[bool], nope_step: int = 0, windowed: str = "sliding") -> list[str]:
    return ["nope" if nope_step and (il + 1) % nope_step == 0 else windowed if s else "full"
            for il, s in enumerate(swa)]


@pytest.mark.parametrize("arch, meta, expected, window", [
    ("llama", {}, kinds_from([False] * 12), None),
    ("gemma2", {}, kinds_from(llama_cpp_swa(2, 12)), 4096),        # llama.cpp's default window
    ("gemma2", {"gemma2.attention.sliding_window": 64}, kinds_from(llama_cpp_swa(2, 12)), 64),
    ("gemma3", {"gemma3.attention.sliding_window": 512}, kinds_from(llama_cpp_swa(6, 12)),
     512),
    ("gemma3", {"gemma3.attention.sliding_window": 0}, kinds_from([False] * 12), None),
    ("olmo2", {}, kinds_from([False] * 12), None),                 # OLMo 2: no window
    ("olmo2", {"olmo2.attention.sliding_window": 32,               # OLMo 3, as converted
               "olmo2.attention.sliding_window_pattern": tuple(llama_cpp_swa(4, 12))},
     kinds_from(llama_cpp_swa(4, 12)), 32),
    ("olmo2", {"olmo2.attention.sliding_window": 32}, kinds_from(llama_cpp_swa(4, 12)), 32),
    ("qwen3", {"qwen3.attention.sliding_window": 8,
               "qwen3.attention.sliding_window_pattern": 3}, kinds_from(llama_cpp_swa(3, 12)),
     8),
    ("smollm3", {}, kinds_from([False] * 12, nope_step=4), None),
    ("llama4", {}, kinds_from([True] * 12, nope_step=4, windowed="chunked"), 8192),
    ("llama4", {"llama4.attention.sliding_window": 0}, kinds_from([False] * 12), None),
])
def test_gguf_layer_kinds_follow_llama_cpp(arch, meta, expected, window):
    kinds = gguf_layer_kinds(meta, arch, 12)
    assert list(kinds.kinds) == expected and kinds.window == window


def test_gguf_bad_pattern_is_one_line():
    with pytest.raises(UserError) as info:
        gguf_layer_kinds({"olmo2.attention.sliding_window": 32,
                          "olmo2.attention.sliding_window_pattern": (True, False)}, "olmo2", 4)
    assert str(info.value) == ("GGUF metadata olmo2.attention.sliding_window_pattern: an array"
                               " of 2 items is not allowed (one bool per layer, 4 layers, or a"
                               " period >= 1)")


def test_gguf_file_keeps_short_numeric_arrays(tmp_path):
    """A per-layer array is kept as a tuple (what gguf's own reader reads), a long one (a
    vocabulary's token types) is not."""
    import gguf

    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(str(path), "olmo2")
    pattern = [True, True, False, True, False]
    writer.add_sliding_window_pattern(pattern)
    writer.add_array("test.long", list(range(MAX_KEPT_ARRAY + 1)))
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_tensor("x", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = GGUFFile(path).metadata
    reader = gguf.GGUFReader(path).fields["olmo2.attention.sliding_window_pattern"]
    assert meta["olmo2.attention.sliding_window_pattern"] == tuple(
        bool(reader.parts[i][0]) for i in reader.data) == tuple(pattern)
    assert meta["test.long"] is None and meta["test.floats"] == (0.5, 1.5)


def test_position_caveat_by_kind():
    assert position_caveat("gpt2", LayerKinds(("full",) * 3)).startswith(
        "before scaling; positions enter as learned absolute embeddings")
    assert position_caveat("llama", LayerKinds(("full",) * 3)) == (
        "before RoPE and scaling; RoPE makes the true kernel depend on the relative position,"
        " and this is its zero-offset slice")
    mixed = position_caveat("llama4_text", LayerKinds(
        ("chunked", "chunked", "chunked", "nope", "chunked", "chunked", "chunked", "nope"), 16))
    assert mixed == (
        "before scaling, by layer kind. RoPE layers (chunked in chunks of 16 tokens: 0-2, 4-6):"
        " taken before RoPE; RoPE makes the true kernel depend on the relative position, and"
        " this is its zero-offset slice. NoPE layers (3, 7): exact, no position enters their"
        " score")
    sliding = position_caveat("olmo3", LayerKinds(("sliding", "full", "sliding"), 8))
    assert "RoPE layers (full: 1; sliding over a window of 8 tokens: 0, 2)" in sliding
    hybrid = position_caveat("qwen3_5_text", LayerKinds(("linear", "linear", "full") * 2))
    assert "Linear-attention layers (0-1, 3-4): no softmax kernel" in hybrid
    assert "RoPE layers (full: 2, 5)" in hybrid


def test_with_layer_type_and_old_records():
    table = pd.DataFrame({"head": [0, 0, 1], "layer": [2, 0, 1], "x": [1.0, 2.0, 3.0]})
    model = {"n_layers": 3, "layer_types": ["sliding", "full", "nope"]}
    out = with_layer_type(table, model)
    assert list(out.columns) == ["head", "layer", "layer_type", "x"]
    assert list(out["layer_type"]) == ["nope", "sliding", "full"]
    assert "layer_type" not in table                               # the input is unchanged
    assert list(with_layer_type(table, {"n_layers": 3})["layer_type"]) == ["full"] * 3


@pytest.mark.parametrize("arch, layers", [("gemma2", 4), ("gemma3_text", 7)])
def test_gguf_gemma_layer_kinds_match_transformers(tmp_path, arch, layers):
    """A Gemma 2 or 3 GGUF as llama.cpp's converter writes it (the window only; the loader
    knows the pattern) labels its layers as transformers runs the Hugging Face model."""
    from gguf_convert import convert_hf_to_gguf

    from weight_geometry.checkpoint import open_checkpoint

    config = {"gemma2": T.Gemma2Config, "gemma3_text": T.Gemma3TextConfig}[arch](
        **{**SMALL, "num_hidden_layers": layers}, head_dim=8, sliding_window=16)
    model = T.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "hf")
    gguf = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "m.gguf")[0]
    ours = open_checkpoint(str(gguf)).layer_kinds
    assert list(ours.kinds) == reference_kinds(model) and ours.window == 16
    assert ours == open_checkpoint(str(tmp_path / "hf")).layer_kinds
    assert "full" in ours.kinds and "sliding" in ours.kinds
