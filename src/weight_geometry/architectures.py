"""Architecture adapters: model dimensions and where each weight lives on disk.

An adapter is declarative: a template per weight type (``{layer}`` filled in) plus which weight
is the FFN input used for the alignment experiment. Adding an architecture means adding one
entry to :data:`HF_ADAPTERS` (Hugging Face ``model_type``) or :data:`GGUF_ARCHITECTURES`.

Weights follow the ``nn.Linear`` convention (out x in): ``W_Q`` is ``(h * d_head, d)`` with rows
``[i * d_head, (i + 1) * d_head)`` belonging to query head ``i``. Biases, QK-norm gains and
LayerNorm/RMSNorm gains are not read: the raw projection weights are analysed, as the notebook
did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UserError

WEIGHT_TYPES = ("W_Q", "W_K", "W_V", "W_O", "W_gate", "W_up", "W_down")


@dataclass(frozen=True)
class ModelDims:
    """Dimensions of a decoder: L layers, width d, FFN width d_ff, h query / n_kv key-value heads.

    ``d_head`` is the config's explicit ``head_dim`` when it has one, else ``d // h``.
    Query head ``i`` reads key/value head ``i // (h // n_kv)``.
    """

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    d_head: int

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of"
                            f" n_kv_heads={self.n_kv_heads}")

    def kv_head(self, head: int) -> int:
        """Key/value head read by query head ``head`` under grouped-query attention."""
        return head // (self.n_heads // self.n_kv_heads)

    def weight_shape(self, weight_type: str) -> tuple[int, int]:
        """Expected (out, in) shape of a weight type."""
        d, q, kv, ff = self.d_model, self.n_heads * self.d_head, self.n_kv_heads * self.d_head, \
            self.d_ff
        return {"W_Q": (q, d), "W_K": (kv, d), "W_V": (kv, d), "W_O": (d, q),
                "W_gate": (ff, d), "W_up": (ff, d), "W_down": (d, ff)}[weight_type]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Adapter:
    """Tensor-name templates of one architecture and its FFN input weight."""

    architecture: str
    names: dict[str, str]
    ffn_input: str = "W_gate"

    def tensor_name(self, weight_type: str, layer: int) -> str:
        return self.names[weight_type].format(layer=layer)


_LLAMA_NAMES = {
    "W_Q": "model.layers.{layer}.self_attn.q_proj.weight",
    "W_K": "model.layers.{layer}.self_attn.k_proj.weight",
    "W_V": "model.layers.{layer}.self_attn.v_proj.weight",
    "W_O": "model.layers.{layer}.self_attn.o_proj.weight",
    "W_gate": "model.layers.{layer}.mlp.gate_proj.weight",
    "W_up": "model.layers.{layer}.mlp.up_proj.weight",
    "W_down": "model.layers.{layer}.mlp.down_proj.weight",
}

#: Hugging Face ``config.model_type`` -> adapter.
HF_ADAPTERS = {
    name: Adapter(name, _LLAMA_NAMES) for name in ("llama", "mistral", "qwen2", "qwen3")
}

_GGUF_NAMES = {
    "W_Q": "blk.{layer}.attn_q.weight",
    "W_K": "blk.{layer}.attn_k.weight",
    "W_V": "blk.{layer}.attn_v.weight",
    "W_O": "blk.{layer}.attn_output.weight",
    "W_gate": "blk.{layer}.ffn_gate.weight",
    "W_up": "blk.{layer}.ffn_up.weight",
    "W_down": "blk.{layer}.ffn_down.weight",
}

#: GGUF ``general.architecture`` -> (adapter, whether llama.cpp permuted Q/K rows for RoPE).
GGUF_ARCHITECTURES = {
    "llama": (Adapter("llama", _GGUF_NAMES), True),
    "mistral": (Adapter("mistral", _GGUF_NAMES), True),
    "qwen2": (Adapter("qwen2", _GGUF_NAMES), False),
    "qwen3": (Adapter("qwen3", _GGUF_NAMES), False),
}


def unsupported(kind: str, name: str, supported) -> UserError:
    return UserError(f"{kind} architecture '{name}' is not supported; supported:"
                     f" {', '.join(sorted(supported))}")


def dims_from_hf_config(config: dict) -> ModelDims:
    """Dimensions from a Hugging Face ``config.json`` dict."""
    h = int(config["num_attention_heads"])
    d = int(config["hidden_size"])
    return ModelDims(
        n_layers=int(config["num_hidden_layers"]),
        d_model=d,
        d_ff=int(config["intermediate_size"]),
        n_heads=h,
        n_kv_heads=int(config.get("num_key_value_heads") or h),
        d_head=int(config.get("head_dim") or d // h),
    )


def dims_from_gguf_metadata(meta: dict, arch: str) -> ModelDims:
    """Dimensions from GGUF metadata keys ``{arch}.block_count`` etc."""
    h = int(meta[f"{arch}.attention.head_count"])
    d = int(meta[f"{arch}.embedding_length"])
    return ModelDims(
        n_layers=int(meta[f"{arch}.block_count"]),
        d_model=d,
        d_ff=int(meta[f"{arch}.feed_forward_length"]),
        n_heads=h,
        n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or h),
        d_head=int(meta.get(f"{arch}.attention.key_length") or d // h),
    )


def undo_gguf_rope_permutation(weight, n_heads: int):
    """Invert llama.cpp's per-head row permutation of W_Q / W_K (its ``permute``).

    llama.cpp reorders each head's ``d_head`` rows from HF's half-split RoPE layout to
    interleaved pairs: rows reshaped ``(n_heads, 2, d_head/2, d)`` and axes 1, 2 swapped. This
    is the inverse, ``(n_heads, d_head/2, 2, d)`` with axes 1, 2 swapped, so rows again match
    the Hugging Face checkpoint. Cost: one copy of the tensor.
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)
