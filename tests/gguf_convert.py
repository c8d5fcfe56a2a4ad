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
  ``4 * n_embd``).

Weights of two or more dimensions whose rows are whole blocks are stored in ``qtype``
(quantized with ``gguf.quants.quantize``), the rest as F32, as the converter keeps norms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

#: Hugging Face ``model_type`` -> GGUF ``general.architecture`` (the converter's model_arch).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
             "gpt2": "gpt2"}
PERMUTED = ("llama", "mistral")
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
           "feed_forward_length": config["intermediate_size"], "attention.head_count": h,
           "attention.head_count_kv": config.get("num_key_value_heads") or h}
    if config.get("head_dim"):
        out["attention.key_length"] = out["attention.value_length"] = config["head_dim"]
    return out


def convert_hf_to_gguf(hf_dir: Path, out: Path, qtype=None, split_max_tensors: int = 0,
                       tokens: int | None = None) -> list[Path]:
    """Write the checkpoint in ``hf_dir`` (config.json, model.safetensors) as GGUF at ``out``;
    split in parts of at most ``split_max_tensors`` tensors when given (``out`` then names
    ``OUT-0000i-of-0000N.gguf``). ``tokens``: a dummy vocabulary of that many tokens (what
    transformers' GGUF loading needs). Returns the files written."""
    import gguf
    from gguf.quants import quantize

    qtype = qtype or gguf.GGMLQuantizationType.F32
    config = json.loads((hf_dir / "config.json").read_text())
    model_type = config["model_type"]
    arch = GGUF_ARCH[model_type]
    hp = _hparams(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hp["block_count"])
    writer = gguf.GGUFWriter(str(out), arch, split_max_tensors=split_max_tensors)
    for key, value in hp.items():
        writer.add_uint32(f"{arch}.{key}", value)
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
    for name, w in load_file(str(hf_dir / "model.safetensors")).items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:   # buffers (GPT-2's attn.bias masks), nothing the converter maps
            continue
        w = w.astype(np.float32)
        if model_type in PERMUTED and name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, hp["attention.head_count"])
        elif model_type in PERMUTED and name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, hp["attention.head_count_kv"])
        if model_type in NORM_PLUS_ONE and name.endswith("norm.weight"):
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
