"""A Hugging Face checkpoint written as GGUF in the layout of llama.cpp's converter.

``convert_hf_to_gguf`` below reimplements, for the dense architectures the library reads, what
llama.cpp's ``convert_hf_to_gguf.py`` does to a model's tensors (ggml-org/llama.cpp; the model
classes named are the converter's):

- names: gguf's own ``get_tensor_name_map(arch)`` (the converter's ``map_tensor_name``);
- ``LlamaModel.modify_tensors`` (``llama``, ``mistral``): the rows of ``q_proj`` / ``k_proj``
  permuted per head from Hugging Face's half-split RoPE layout to interleaved pairs
  (``LlamaModel.permute``: ``(n_head, 2, d_head / 2, d)``, axes 1 and 2 swapped);
- ``GemmaModel``, ``Gemma2Model``, ``Gemma3Model.modify_tensors``: every ``*norm.weight``
  stored as ``w + 1`` (Gemma's RMSNorm multiplies by ``1 + w``; QK-norms included);
- ``GPT2Model.modify_tensors``: ``c_attn``, ``c_proj``, ``c_fc`` weights transposed (``Conv1D``
  is ``(in, out)``; GGUF stores them ``(out, in)`` like every other architecture);
- ``Phi3MiniModel``, ``Qwen2Model``, ``Qwen3Model``: tensors as they are (Phi-3's fused
  ``qkv_proj`` becomes ``attn_qkv``, its ``gate_up_proj`` ``ffn_up``, rows unchanged);
- the hyperparameters each ``set_gguf_parameters`` writes that the readers here use
  (``key_length`` where the config has a ``head_dim``; GPT-2's ``feed_forward_length`` is
  ``4 * n_embd``; ``expert_count``, ``expert_feed_forward_length`` (Qwen-MoE's
  ``moe_intermediate_size``, gpt-oss's ``intermediate_size``) and
  ``expert_shared_feed_forward_length`` of mixture-of-experts models).

Mixture-of-experts models (``mixtral`` as ``llama``, ``qwen2moe``, ``qwen3moe``, ``olmoe``,
``gpt-oss``), as the converter's ``modify_tensors`` (and the generic expert merging of its
``TextModel``) write them:

- each layer's per-expert ``experts.N.{gate,up,down}_proj`` (Mixtral: ``w1``, ``w3``, ``w2``)
  stacked into 3-D ``ffn_{gate,up,down}_exps`` ``(E, out, in)``; the router ``gate`` as
  ``ffn_gate_inp``; Qwen2-MoE's ``shared_expert.*`` as ``ffn_*_shexp`` and its
  ``shared_expert_gate`` ``(1, d)`` as ``ffn_gate_inp_shexp`` ``(d,)`` (llama.cpp's shape,
  which transformers' GGUF loading expands back);
- ``GptOssModel``: the fused ``gate_up_proj`` ``(E, d, 2 d_ff)`` (``x @ W``) transposed and
  de-interleaved (columns ``::2`` gate, ``1::2`` up) into ``ffn_gate_exps`` and
  ``ffn_up_exps``, ``down_proj`` ``(E, d_ff, d)`` transposed; a published MXFP4 checkpoint's
  ``*_blocks`` / ``*_scales`` repacked, losslessly, into ggml's MXFP4 type
  (``repack_mxfp4``: the 17-byte ggml block is the scale byte, then 16 bytes whose byte ``j``
  holds value ``j`` in its low nibble and value ``j + 16`` in its high one); ``sinks`` as
  ``attn_sinks``.

SmolLM3 (``SmolLM3Model``, a ``LlamaModel``: Q/K rows permuted), OLMo 2 and 3 (``olmo2``,
``Olmo2Model``: OLMo 3's ``sliding_window`` and a per-layer ``sliding_window_pattern``) and
Llama 4 (``llama4``, ``Llama4Model``: no permutation; ``feed_forward_length`` is
``intermediate_size_mlp``, ``expert_feed_forward_length`` ``intermediate_size``; the fused
``x @ W`` experts transposed, ``gate_up_proj`` split into halves, gate first).

Gemma 4 (``gemma4_text`` as ``gemma4``: ``Gemma4Model``, registered for
``Gemma4ForConditionalGeneration``, whose text config this is): every norm as it is
(``norm_shift`` 0: Gemma 4's RMSNorm multiplies by ``w``), ``layer_scalar`` as
``layer_output_scale.weight``, the extra ``rope_freqs`` tensor, and per-layer metadata:
``key_length``/``key_length_swa``, ``sliding_window_pattern``, ``shared_kv_layers``, arrays
``head_count_kv`` and ``feed_forward_length`` (``_gemma4_hparams``); a layer that reuses keys and
values has no ``k_proj``/``v_proj`` to write, one whose values are its keys no ``v_proj``. Its
mixture of experts (``enable_moe_block``), as ``Gemma4Model`` and gguf-py's name map write it:
``experts.gate_up_proj`` ``(E, 2 d_e, d)`` (``.weight`` appended, ``filter_tensors``) as
``ffn_gate_up_exps``, gate rows first, ``experts.down_proj`` as ``ffn_down_exps``,
``router.proj`` as ``ffn_gate_inp``, ``router.scale`` as ``ffn_gate_inp.scale`` and
``router.per_expert_scale`` as ``ffn_down_exps.scale`` (``modify_tensors``),
``pre_feedforward_layernorm_2`` as ``pre_ffw_norm_2``, ``post_feedforward_layernorm_1``/``_2``
as ``post_ffw_norm_1``/``_2``, the dense FFN beside the experts as ``ffn_gate``/``ffn_up``/
``ffn_down``; ``expert_count`` (``num_experts``), ``expert_used_count`` (``top_k_experts``:
``TextModel.set_gguf_parameters``) and ``expert_feed_forward_length``
(``moe_intermediate_size``).

Weights of two or more dimensions whose rows are whole blocks are stored in ``qtype``
(quantized with ``gguf.quants.quantize``), the rest as F32, as the converter keeps norms.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

#: Hugging Face ``model_type`` -> GGUF ``general.architecture`` (the converter's model_arch).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
             "gpt2": "gpt2", "mixtral": "llama", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe", "olmoe": "olmoe", "gpt_oss": "gpt-oss"}
GGUF_ARCH.update({"smollm3": "smollm3", "olmo2": "olmo2", "olmo3": "olmo2",
                  "llama4_text": "llama4"})
PERMUTED = ("llama", "mistral", "mixtral", "smollm3")
#: A per-expert tensor: (layer prefix, expert, its projection's name).
PER_EXPERT = re.compile(r"(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight")
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3_text")
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute``: each head's rows from half-split to interleaved RoPE pairs."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def _hparams(config: dict) -> dict[str, int]:
    """The GGUF hyperparameters (without the ``{arch}.`` prefix) of a config.json."""
    if config["model_type"] == "gpt2":
        d = config["n_embd"]
        return {"block_count": config["n_layer"],
                "context_length": config.get("n_ctx", config.get("n_positions")),
                "embedding_length": d, "feed_forward_length": 4 * d,
                "attention.head_count": config["n_head"]}
    h = config["num_attention_heads"]
    out = {"block_count": config["num_hidden_layers"],
           "context_length": config["max_position_embeddings"],
           "embedding_length": config["hidden_size"],
           "attention.head_count": h,
           "attention.head_count_kv": config.get("num_key_value_heads") or h}
    if "intermediate_size" in config:   # not in Qwen3.5-MoE's, whose FFNs are all experts
        out["feed_forward_length"] = config["intermediate_size"]
    if config.get("head_dim"):
        out["attention.key_length"] = out["attention.value_length"] = config["head_dim"]
    n_experts = config.get("num_local_experts") or config.get("num_experts")
    if n_experts:
        out["expert_count"] = n_experts
        out["expert_used_count"] = config.get("num_experts_per_tok") or config["top_k_experts"]
    d_expert = (config["intermediate_size"] if config["model_type"] in ("gpt_oss", "llama4_text")
                else config.get("moe_intermediate_size"))
    if config["model_type"] == "llama4_text":   # Llama4Model: dense FFNs, MoE interleave
        out["feed_forward_length"] = config["intermediate_size_mlp"]
        out["interleave_moe_layer_step"] = config["interleave_moe_layer_step"]
    if d_expert:
        out["expert_feed_forward_length"] = d_expert
    if config.get("shared_expert_intermediate_size"):
        out["expert_shared_feed_forward_length"] = config["shared_expert_intermediate_size"]
    return out


def repack_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """gpt-oss's MXFP4 ``blocks`` ``(..., G, 16)`` (values ``2j``, ``2j + 1`` in the low and
    high nibbles of byte ``j``) and ``scales`` ``(..., G)`` as ggml's MXFP4 rows ``(..., 17 G)``:
    per group the scale byte, then byte ``j`` = value ``j`` | value ``j + 16`` << 4."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([scales[..., None], packed], axis=-1).reshape(
        *scales.shape[:-1], scales.shape[-1] * 17).astype(np.uint8)


def _hf_tensors(hf_dir: Path, model_type: str, n_experts: int):
    """``(Hugging Face name, array)`` as the converter's ``modify_tensors`` hands them on:
    per-expert tensors stacked ``(E, out, in)`` under ``...experts.{proj}.weight``; gpt-oss's
    fused experts cut into ``experts.{gate,up,down}_proj.weight`` ``(E, out, in)``, or for a
    MXFP4 checkpoint into ``(blocks, scales)`` pairs of that orientation."""
    tensors = load_file(str(hf_dir / "model.safetensors"))
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, w in tensors.items():
        if (m := PER_EXPERT.fullmatch(name)):
            key = f"{m['prefix']}.{m['proj']}.weight"
            group = stacks.setdefault(key, {})
            group[int(m["expert"])] = w
            if len(group) == n_experts:
                del stacks[key]
                yield key, np.stack([group[e] for e in range(n_experts)])
            continue
        if model_type == "gpt_oss" and ".mlp.experts." in name:
            yield from _gpt_oss_experts(name, w, tensors)
            continue
        if model_type == "llama4_text" and ".feed_forward.experts." in name:
            yield from _llama4_experts(name, w)
            continue
        if name.endswith((".sinks", ".layer_scalar")) or (   # Gemma4Model.filter_tensors too
                model_type == "gemma4_text" and ".experts." in name):
            name += ".weight"
        if name.endswith("shared_expert_gate.weight"):  # (1, d) stored as llama.cpp's (d,)
            w = w.reshape(-1)
        yield name, w


def _gpt_oss_experts(name: str, w: np.ndarray, tensors: dict):
    prefix, _, tail = name.rpartition(".")
    if tail == "gate_up_proj":                # (E, d, 2 d_ff), x @ W
        w = w.swapaxes(-1, -2)
        yield f"{prefix}.gate_proj.weight", w[:, ::2]
        yield f"{prefix}.up_proj.weight", w[:, 1::2]
    elif tail == "down_proj":                 # (E, d_ff, d), x @ W
        yield f"{prefix}.down_proj.weight", w.swapaxes(-1, -2)
    elif tail == "gate_up_proj_bias":
        yield f"{prefix}.gate_proj.bias", w[:, ::2]
        yield f"{prefix}.up_proj.bias", w[:, 1::2]
    elif tail == "down_proj_bias":
        yield f"{prefix}.down_proj.bias", w
    elif tail == "gate_up_proj_blocks":       # (E, 2 d_ff, G, 16), (out, in) rows
        scales = tensors[f"{prefix}.gate_up_proj_scales"]
        yield f"{prefix}.gate_proj.weight", (w[:, ::2], scales[:, ::2])
        yield f"{prefix}.up_proj.weight", (w[:, 1::2], scales[:, 1::2])
    elif tail == "down_proj_blocks":
        yield f"{prefix}.down_proj.weight", (w, tensors[f"{prefix}.down_proj_scales"])


def _llama4_experts(name: str, w: np.ndarray):
    """``Llama4Model.modify_tensors``: the fused ``x @ W`` experts transposed to ``(E, out,
    in)``, ``gate_up_proj`` ``(E, d, 2 d_ff)`` split into its halves (gate first)."""
    prefix, _, tail = name.rpartition(".")
    w = w.swapaxes(-1, -2)
    if tail == "gate_up_proj":
        yield f"{prefix}.gate_proj.weight", w[:, :w.shape[1] // 2]
        yield f"{prefix}.up_proj.weight", w[:, w.shape[1] // 2:]
    else:
        yield f"{prefix}.down_proj.weight", w


def _sliding_window(writer, arch: str, config: dict) -> None:
    """``Gemma2Model``, ``Gemma3Model.set_gguf_parameters``: the window (llama.cpp's loader
    hard-codes which layers slide); ``Olmo2Model`` (OLMo 3): the window and, per layer, whether
    it slides (``layer_types``)."""
    if arch in ("gemma2", "gemma3") and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if arch == "olmo2" and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern([t == "sliding_attention"
                                           for t in config["layer_types"]])


#: DeepSeek-V2/V3's ``model_type``s, written as ``deepseek2``.
LATENT = ("deepseek_v2", "deepseek_v3")
GGUF_ARCH.update(dict.fromkeys(LATENT, "deepseek2"))
GGUF_ARCH.update({"glm4_moe": "glm4moe", "minimax_m2": "minimax-m2"})


def _glm_minimax_hparams(config: dict) -> dict[str, int]:
    """``Glm4MoeModel.set_gguf_parameters``: ``block_count`` counts the multi-token-prediction
    layers too, the routed experts (``n_routed_experts``), ``expert_shared_count``,
    ``leading_dense_block_count``, ``nextn_predict_layers`` and ``rope.dimension_count`` =
    ``int(head_dim * partial_rotary_factor)`` (its default 0.5); ``MiniMaxM2Model``: the expert
    width ``intermediate_size`` and ``rope.dimension_count`` = ``rotary_dim``."""
    if config["model_type"] == "minimax_m2":
        return {"expert_feed_forward_length": config["intermediate_size"],
                "rope.dimension_count": config["rotary_dim"]}
    nextn = config.get("num_nextn_predict_layers", 0)
    return {"block_count": config["num_hidden_layers"] + nextn,
            "expert_count": config["n_routed_experts"],
            "expert_used_count": config["num_experts_per_tok"],
            "expert_shared_count": config["n_shared_experts"],
            "leading_dense_block_count": config["first_k_dense_replace"],
            "nextn_predict_layers": nextn,
            "rope.dimension_count": int(config["head_dim"]
                                        * config.get("partial_rotary_factor", 0.5))}


def _mla_hparams(config: dict) -> dict[str, int]:
    """``DeepseekV2Model.set_gguf_parameters``: MLA stored as MQA over the latent (one KV
    head, ``key_length = kv_lora_rank + rope``, ``value_length = kv_lora_rank``), the heads'
    own widths as ``*_mla``, the query LoRA rank where there is one, the leading dense layers,
    the experts."""
    rope, kv = config["qk_rope_head_dim"], config["kv_lora_rank"]
    out = {"attention.head_count_kv": 1, "attention.key_length": kv + rope,
           "attention.value_length": kv, "attention.kv_lora_rank": kv,
           "attention.key_length_mla": config["qk_nope_head_dim"] + rope,
           "attention.value_length_mla": config["v_head_dim"], "rope.dimension_count": rope,
           "leading_dense_block_count": config["first_k_dense_replace"],
           "expert_count": config["n_routed_experts"],
           "expert_used_count": config["num_experts_per_tok"],
           "expert_shared_count": config["n_shared_experts"]}
    if config.get("q_lora_rank"):
        out["attention.q_lora_rank"] = config["q_lora_rank"]
    return out


def _split_kv_b(tensors, config: dict):
    """``DeepseekV2Model.modify_tensors``: each ``kv_b_proj`` ``(h (nope + v), r)`` viewed per
    head and split into ``k_b_proj`` ``(h, r, nope)`` (each head's K rows, transposed) and
    ``v_b_proj`` ``(h, v, r)``; every other tensor as it is."""
    nope, h = config["qk_nope_head_dim"], config["num_attention_heads"]
    for name, w in tensors:
        if name.endswith("kv_b_proj.weight"):
            kv_b = w.reshape(h, -1, w.shape[-1])
            yield name.replace("kv_b_proj", "k_b_proj"), kv_b[:, :nope].swapaxes(1, 2)
            yield name.replace("kv_b_proj", "v_b_proj"), kv_b[:, nope:]
        else:
            yield name, w


#: Gemma 4 (``Gemma4Model``): its text model, written as ``gemma4``.
GGUF_ARCH["gemma4_text"] = "gemma4"


def _gemma4_full_layer(config: dict, key: str, published: str):
    """A global layer's ``key`` (``head_dim``, ``num_key_value_heads``): the published
    config's ``published`` key (``global_head_dim``, ``num_global_key_value_heads``: what the
    converter reads), else, as transformers 5 saves a config, its ``per_layer_config`` entry of
    the first global layer (None where it has none)."""
    if config.get(published) is not None:
        return config[published]
    first = config["layer_types"].index("full_attention")
    return (config.get("per_layer_config") or {}).get(str(first), {}).get(key)


def _gemma4_hparams(config: dict) -> dict:
    """``Gemma4Model.set_gguf_parameters``: ``sliding_window`` (``Gemma3Model``'s) and
    ``sliding_window_pattern`` (per layer, whether it slides: ``layer_types``),
    ``key_length``/``value_length`` the global layers' head size and ``*_swa`` the sliding
    layers' (``head_dim``), ``shared_kv_layers``,
    ``embedding_length_per_layer_input``, ``rope.dimension_count`` (the global head size:
    proportional RoPE through ``rope_freqs``) and ``rope.dimension_count_swa``
    (``head_dim * partial_rotary_factor``); ``head_count_kv`` an array (sliding layers'
    ``num_key_value_heads``, global ones' ``num_global_key_value_heads``) where the config has
    a global count; ``feed_forward_length`` an array (``intermediate_size``, twice that from
    the first layer reusing keys and values on) where ``use_double_wide_mlp``."""
    swa = [t == "sliding_attention" for t in config["layer_types"]]
    full, m = _gemma4_full_layer(config, "head_dim", "global_head_dim"), config["head_dim"]
    n_kv_full = _gemma4_full_layer(config, "num_key_value_heads", "num_global_key_value_heads")
    shared, n_ff = config.get("num_kv_shared_layers", 0), config["intermediate_size"]
    first = config["num_hidden_layers"] - shared
    out = {"attention.sliding_window": config["sliding_window"],
           "attention.sliding_window_pattern": swa,
           "attention.key_length": full, "attention.value_length": full,
           "attention.key_length_swa": m, "attention.value_length_swa": m,
           "attention.shared_kv_layers": shared,
           "embedding_length_per_layer_input": config.get("hidden_size_per_layer_input") or 0,
           "rope.dimension_count": full,
           "rope.dimension_count_swa": int(m * config.get("partial_rotary_factor", 1.0))}
    if config.get("use_double_wide_mlp"):
        out["feed_forward_length"] = [n_ff * (1 if i < first else 2) for i in range(len(swa))]
    if n_kv_full is not None:
        out["attention.head_count_kv"] = [config["num_key_value_heads"] if s else n_kv_full
                                          for s in swa]
    return out


#: ``Gemma4Model.modify_tensors``: the router's gain and each expert's output scale, which
#: gguf-py's name map does not know, as the ``scale`` tensors of ``ffn_gate_inp`` and
#: ``ffn_down_exps``.
GEMMA4_SCALES = re.compile(
    r"model\.layers\.(?P<bid>\d+)\.router\.(?P<which>scale|per_expert_scale)")


def _gemma4_scale_name(name: str) -> str | None:
    """The GGUF name of a Gemma 4 router's ``scale`` or ``per_expert_scale`` (None for any
    other tensor)."""
    if not (m := GEMMA4_SCALES.fullmatch(name)):
        return None
    return f"blk.{m['bid']}.{'ffn_gate_inp' if m['which'] == 'scale' else 'ffn_down_exps'}.scale"


def _gemma4_rope_freqs(config: dict) -> np.ndarray:
    """``Gemma4Model.generate_extra_tensors``: ``rope_freqs`` (global layers' proportional
    RoPE), 1 for each rotated pair and 1e30 for the others."""
    full = _gemma4_full_layer(config, "head_dim", "global_head_dim")
    factor = config["rope_parameters"]["full_attention"]["partial_rotary_factor"]
    rotated = int(full * factor / 2)
    return np.array([1.0] * rotated + [1e30] * (full // 2 - rotated), dtype=np.float32)


#: Hybrids: ``Qwen3NextModel``, ``Qwen3_5TextModel``, ``Qwen3_5MoeTextModel``.
HYBRID = {"qwen3_next": "qwen3next", "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe"}
GGUF_ARCH.update(HYBRID)


def _hybrid_hparams(config: dict) -> dict[str, int]:
    """``Qwen3NextModel.set_gguf_parameters``: ``full_attention_interval`` (config.json's, else
    4: the converter does not read ``layer_types``) and ``rope.dimension_count`` =
    ``int(head_dim * partial_rotary_factor)`` (top-level key, else 0.25)."""
    return {"full_attention_interval": config.get("full_attention_interval", 4),
            "rope.dimension_count": int(config["head_dim"]
                                        * config.get("partial_rotary_factor", 0.25))}


def _fused_gate_up(pending: dict, name: str, w: np.ndarray):
    """The converter's ``--fuse-gate-up-exps``: a layer's ``ffn_gate_exps`` and ``ffn_up_exps``
    ``(E, d_e, d)`` written as one ``ffn_gate_up_exps`` ``(E, 2 d_e, d)``, gate rows first,
    once both are seen; ``(name, None)`` before."""
    pending[name] = w
    gate = name.replace("ffn_up_exps", "ffn_gate_exps")
    up = name.replace("ffn_gate_exps", "ffn_up_exps")
    if gate not in pending or up not in pending:
        return name, None
    return (gate.replace("ffn_gate_exps", "ffn_gate_up_exps"),
            np.concatenate([pending.pop(gate), pending.pop(up)], axis=1))


def convert_hf_to_gguf(hf_dir: Path, out: Path, qtype=None, split_max_tensors: int = 0,
                       tokens: int | None = None, fuse_gate_up_exps: bool = False,
                       per_expert: bool = False, metadata: dict | None = None) -> list[Path]:
    """Write the checkpoint in ``hf_dir`` (config.json, model.safetensors) as GGUF at ``out``;
    split in parts of at most ``split_max_tensors`` tensors when given (``out`` then names
    ``OUT-0000i-of-0000N.gguf``). ``tokens``: a dummy vocabulary of that many tokens (what
    transformers' GGUF loading needs); ``fuse_gate_up_exps``: the experts' gate and up in one
    tensor (:func:`_fused_gate_up`); ``per_expert``: each expert's weights as 2-D tensors
    ``ffn_{gate,up,down}.{e}.weight``, as llama.cpp's first Mixtral files (its loader's
    ``LLM_TENSOR_FFN_*_EXP``); ``metadata``: hyperparameters (without the ``{arch}.`` prefix;
    a list is an array, None leaves the key out) written in place of the converter's, for a
    file whose metadata contradicts its tensors. Returns the files written."""
    import gguf
    from gguf.quants import quantize

    qtype = qtype or gguf.GGMLQuantizationType.F32
    config = json.loads((hf_dir / "config.json").read_text())
    model_type = config["model_type"]
    arch = GGUF_ARCH[model_type]
    hp = _hparams(config)
    if model_type in LATENT:
        hp.update(_mla_hparams(config))
    if model_type in ("glm4_moe", "minimax_m2"):
        hp.update(_glm_minimax_hparams(config))
    if model_type in HYBRID:
        hp.update(_hybrid_hparams(config))
    if arch == "gemma4":
        hp.update(_gemma4_hparams(config))
    hp = {key: value for key, value in {**hp, **(metadata or {})}.items() if value is not None}
    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(model_arch, hp["block_count"])
    writer = gguf.GGUFWriter(str(out), arch, split_max_tensors=split_max_tensors)
    for key, value in hp.items():
        if isinstance(value, list):    # per layer (Gemma 4: ints, or bools for the pattern)
            writer.add_array(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    _sliding_window(writer, arch, config)
    eps = config.get("rms_norm_eps") or config.get("layer_norm_epsilon") or 1e-5
    writer.add_float32(f"{arch}.attention.layer_norm_{'' if arch == 'gpt2' else 'rms_'}epsilon",
                       eps)
    if tokens:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(tokens)])
        writer.add_token_types([1] * tokens)
        writer.add_token_merges(["t 0"])
        for special in ("bos", "eos", "pad"):
            getattr(writer, f"add_{special}_token_id")(0)
    tensors, pending = _hf_tensors(hf_dir, model_type, hp.get("expert_count", 0)), {}
    if arch == "gemma4":
        writer.add_tensor("rope_freqs.weight", _gemma4_rope_freqs(config))
    for name, w in _split_kv_b(tensors, config) if model_type in LATENT else tensors:
        gguf_name = (_gemma4_scale_name(name) if arch == "gemma4" else None) or names.get_name(
            name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:   # buffers (GPT-2's attn.bias masks), nothing the converter maps
            continue
        if fuse_gate_up_exps and gguf_name.endswith(("ffn_gate_exps.weight",
                                                      "ffn_up_exps.weight")):
            gguf_name, w = _fused_gate_up(pending, gguf_name, w)
            if w is None:
                continue
        if per_expert and gguf_name.endswith("_exps.weight"):
            for e, w_e in enumerate(w):
                writer.add_tensor(gguf_name.replace("_exps.weight", f".{e}.weight"), w_e)
            continue
        if isinstance(w, tuple):            # MXFP4 blocks and scales, repacked losslessly
            data = repack_mxfp4(*w)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape,
                              raw_dtype=gguf.GGMLQuantizationType.MXFP4)
            continue
        w = w.astype(np.float32)
        if model_type in PERMUTED and name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, hp["attention.head_count"])
        elif model_type in PERMUTED and name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, hp["attention.head_count_kv"])
        if model_type in NORM_PLUS_ONE and name.endswith("norm.weight"):
            w = w + 1
        if (model_type in HYBRID and name.endswith("norm.weight")  # Qwen3NextModel: all but
                and not name.endswith("linear_attn.norm.weight")):  # the DeltaNet's own
            w = w + 1
        if model_type == "gpt2" and name.endswith(CONV1D):
            w = w.T
        w = np.ascontiguousarray(w)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if w.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32 and w.shape[-1] % block == 0:
            if qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(gguf_name, w.astype(np.float16))
            else:
                data = quantize(w, qtype)
                writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, w)
    files = writer.format_shard_names(out) if split_max_tensors else [out]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return files
