"""Architecture adapters: model dimensions and where each weight lives on disk.

An adapter is declarative: a layer prefix, and for each weight type the tensor it comes from,
how to cut it out of a fused tensor, and whether the tensor is stored transposed (GPT-2's
``Conv1D`` is ``(in, out)``). Adding an architecture is adding one entry to :data:`HF_ADAPTERS`
(keyed by ``config.model_type``) or :data:`GGUF_ADAPTERS` (``general.architecture``).

Weights come out in the ``nn.Linear`` convention (out x in): ``W_Q`` is ``(h * d_head, d)`` with
rows ``[i * d_head, (i + 1) * d_head)`` belonging to query head ``i``. Gated FFNs have
``W_gate, W_up, W_down`` and the alignment uses ``W_gate``; non-gated FFNs (GPT-2, GPT-NeoX)
have ``W_up, W_down`` and the alignment uses their input projection ``W_up``.

Biases are never read. Norm gains (pre-attention and pre-FFN LayerNorm/RMSNorm, and QK-norm
gains) are left out by default, as in the notebook; with ``fold_norms`` they are folded in:
``W <- W diag(g)`` for the projections reading a normed input (``g = 1 + w`` where the
architecture stores ``w``, as Gemma's Hugging Face checkpoints do; its GGUF files store
``1 + w``), and ``W_Q_i <- diag(g_q) W_Q_i`` for QK-norm gains.
LayerNorm biases and the normalisation itself are not linear and are not folded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

import numpy as np

from .errors import UserError
from .gemma4 import GEMMA4_TYPES, gemma4_layers
from .gemma4 import NOT_USED as GEMMA4_NOT_USED

#: Weight types of a gated-FFN layer; a non-gated layer has these less W_gate.
GATED = ("W_Q", "W_K", "W_V", "W_O", "W_gate", "W_up", "W_down")


@dataclass(frozen=True)
class ModelDims:
    """Dimensions of a decoder: L layers, width d, FFN width d_ff, h query / n_kv key-value heads.

    ``d_head`` is the config's explicit ``head_dim`` when it has one, else ``d // h``.
    Query head ``i`` reads key/value head ``i // (h // n_kv)``: ``n_kv`` divides ``h`` (the
    functions building these from a checkpoint's config check it, naming the config's keys).

    Where layers differ (Gemma 4: :func:`gemma4_layers`), ``head_dims``, ``kv_heads`` and
    ``ffn_widths`` hold each layer's head size, KV-head count and FFN width, and ``d_head``,
    ``n_kv_heads`` are the largest (the widths of the stored arrays: :mod:`head_layout`);
    :meth:`layer` gives one layer's dimensions. None: every layer has the scalars.
    """

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    head_dims: tuple[int, ...] | None = None
    kv_heads: tuple[int, ...] | None = None
    ffn_widths: tuple[int, ...] | None = None

    def layer(self, layer: int) -> ModelDims:
        """The dimensions of ``layer`` alone (uniform: ``self`` where no layer differs)."""
        if self.head_dims is None and self.ffn_widths is None:
            return self
        pick = {name: getattr(self, per)[layer] for name, per in
                (("d_head", "head_dims"), ("n_kv_heads", "kv_heads"), ("d_ff", "ffn_widths"))
                if getattr(self, per) is not None}
        return replace(self, head_dims=None, kv_heads=None, ffn_widths=None, **pick)

    def weight_shape(self, weight_type: str) -> tuple[int, int]:
        """(out, in) shape of a weight type."""
        d, ff = self.d_model, self.d_ff
        q, kv = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        return {"W_Q": (q, d), "W_K": (kv, d), "W_V": (kv, d), "W_O": (d, q),
                "W_gate": (ff, d), "W_up": (ff, d), "W_down": (d, ff)}[weight_type]

    def as_dict(self) -> dict:
        """The ``model.json`` record's dimensions; the per-layer lists only where layers
        differ."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if v is not None}


# --- how a weight is cut out of its stored tensor -------------------------------------------

@dataclass(frozen=True)
class Whole:
    """The tensor is the weight."""

    def raw_shape(self, dims: ModelDims, weight_type: str) -> tuple[int, int]:
        return dims.weight_shape(weight_type)

    def apply(self, tensor: np.ndarray, dims: ModelDims) -> np.ndarray:
        return tensor


@dataclass(frozen=True)
class RowBlock:
    """Block ``index`` of a tensor whose rows are consecutive blocks (Phi-3 ``qkv_proj``:
    [Q | K | V]; ``gate_up_proj``: [gate | up]; GPT-2 ``c_attn`` after transposing)."""

    index: int
    blocks: Callable[[ModelDims], tuple[int, ...]]

    def raw_shape(self, dims: ModelDims, weight_type: str) -> tuple[int, int]:
        return sum(self.blocks(dims)), dims.weight_shape(weight_type)[1]

    def apply(self, tensor: np.ndarray, dims: ModelDims) -> np.ndarray:
        sizes = self.blocks(dims)
        start = sum(sizes[:self.index])
        return tensor[start:start + sizes[self.index]]


@dataclass(frozen=True)
class HeadInterleaved:
    """Part ``index`` of a tensor whose rows hold, per query head, ``parts`` blocks of
    ``d_head`` rows: GPT-NeoX's ``query_key_value`` ``[Q_0 K_0 V_0 Q_1 K_1 V_1 ...]``
    (``parts=3``: 0 = Q, 1 = K, 2 = V), or Qwen3.5's and Qwen3-Next's gated ``q_proj``
    ``[Q_0 G_0 Q_1 G_1 ...]`` (``parts=2``: 0 = the query; ``G_i``, the rows of head ``i``'s
    output gate ``sigmoid(G_i x)``, are not part of the score). Input ``(parts h d_head, d)``,
    output ``(h d_head, d)``."""

    index: int
    parts: int = 3

    def raw_shape(self, dims: ModelDims, weight_type: str) -> tuple[int, int]:
        return self.parts * dims.n_heads * dims.d_head, dims.d_model

    def apply(self, tensor: np.ndarray, dims: ModelDims) -> np.ndarray:
        h, dh = dims.n_heads, dims.d_head
        return tensor.reshape(h, self.parts, dh, -1)[:, self.index].reshape(h * dh, -1)


@dataclass(frozen=True)
class RowInterleaved:
    """Rows ``index::parts`` of a tensor whose rows alternate between ``parts`` weights
    (gpt-oss's ``gate_up_proj`` in ``(out, in)`` orientation: row ``2i`` is W_gate's row ``i``,
    row ``2i + 1`` W_up's row ``i``). A strided view: the caller makes it contiguous."""

    index: int
    parts: int = 2

    def raw_shape(self, dims: ModelDims, weight_type: str) -> tuple[int, int]:
        out, inp = dims.weight_shape(weight_type)
        return self.parts * out, inp

    def apply(self, tensor: np.ndarray, dims: ModelDims) -> np.ndarray:
        return tensor[self.index::self.parts]


@dataclass(frozen=True)
class WeightSpec:
    """Where one weight type comes from: tensor name (after the layer prefix), cut, layout."""

    tensor: str
    cut: Whole | RowBlock | HeadInterleaved | RowInterleaved = Whole()
    transposed: bool = False

    def raw_shape(self, dims: ModelDims, weight_type: str) -> tuple[int, int]:
        shape = self.cut.raw_shape(dims, weight_type)
        return shape[::-1] if self.transposed else shape

    def extract(self, tensor: np.ndarray, dims: ModelDims) -> np.ndarray:
        return self.cut.apply(tensor.T if self.transposed else tensor, dims)


#: Weight types that latent attention forms from its factors (:attr:`Adapter.latent`).
LATENT_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O")
#: The stored weights of latent attention (:class:`LatentLayout` fields), in reading order.
LATENT_PARTS = ("q_a", "q_b", "q", "kv_a", "kv_b", "o")
#: Weight types of one expert of a mixture-of-experts FFN (a gated FFN of its own).
EXPERT_WEIGHTS = ("W_gate", "W_up", "W_down")
#: The ``expert`` label of a shared expert (Qwen2-MoE's ``shared_expert``), which every token
#: passes through beside the routed ones.
SHARED = "shared"


@dataclass(frozen=True)
class MoeDims:
    """A mixture-of-experts decoder's FFNs: ``n_experts`` routed experts of width ``d_expert``,
    a shared expert of width ``d_shared`` (0: none), in the layers ``sparse_layers``; every
    other layer has a dense FFN of width ``ModelDims.d_ff`` (Qwen-MoE's ``mlp_only_layers`` and
    ``decoder_sparse_step``)."""

    n_experts: int
    d_expert: int
    d_shared: int
    sparse_layers: frozenset[int]

    @property
    def experts(self) -> tuple[int | str, ...]:
        """Expert labels of a sparse layer: ``0 .. E-1``, then :data:`SHARED` if there is one."""
        return (*range(self.n_experts), *((SHARED,) if self.d_shared else ()))

    def expert_dims(self, dims: ModelDims, expert: int | str) -> ModelDims:
        """``dims`` with ``d_ff`` the width of ``expert``: its W_gate/W_up are ``(d_ff_e, d)``,
        its W_down ``(d, d_ff_e)`` (:meth:`ModelDims.weight_shape`)."""
        return replace(dims, d_ff=self.d_shared if expert == SHARED else self.d_expert)

    def as_dict(self) -> dict:
        return {"n_experts": self.n_experts, "d_expert": self.d_expert,
                "d_shared": self.d_shared, "sparse_layers": sorted(self.sparse_layers)}


@dataclass(frozen=True)
class ExpertLayout:
    """Where a sparse layer's experts live (names after the layer prefix).

    ``router``: the ``(E, d)`` router (``gate.weight``: expert e's logit is row e times the
    normed stream). ``experts``: W_gate, W_up, W_down of expert ``e``, either one tensor per
    expert (names holding ``{expert}``, e.g. Mixtral's ``block_sparse_moe.experts.{expert}.w1``)
    or, with ``fused``, 3-D tensors ``(E, out, in)`` whose slice ``e`` is cut as a 2-D weight
    (transformers 5's in-memory ``experts.gate_up_proj`` ``(E, 2 d_ff, d)`` = [gate | up] and
    ``experts.down_proj`` ``(E, d, d_ff)``), read one slice at a time. ``shared``: the shared
    expert's weights (no ``{expert}``). ``shared_gate``: the ``(1, d)`` gate of the shared
    expert (Qwen2-MoE's ``shared_expert_gate``: its output is scaled by ``sigmoid(g . x)``, a
    router row of its own), None where there is none.
    """

    router: str
    experts: dict[str, WeightSpec]
    fused: bool = False
    shared: dict[str, WeightSpec] = field(default_factory=dict)
    shared_gate: str | None = None

    def tensor_name(self, weight_type: str, layer_prefix: str, expert: int | str) -> str:
        """The stored tensor of ``weight_type`` of ``expert`` (for a fused layout: the 3-D
        tensor holding every routed expert)."""
        if expert == SHARED:
            return layer_prefix + self.shared[weight_type].tensor
        return layer_prefix + self.experts[weight_type].tensor.format(expert=expert)

    def spec(self, weight_type: str, expert: int | str) -> WeightSpec:
        return (self.shared if expert == SHARED else self.experts)[weight_type]

    def raw_shape(self, weight_type: str, dims: ModelDims, moe: MoeDims, expert: int | str
                  ) -> tuple[int, ...]:
        """Shape of the stored tensor (``(E, ...)`` for a fused one)."""
        shape = self.spec(weight_type, expert).raw_shape(moe.expert_dims(dims, expert),
                                                         weight_type)
        return (moe.n_experts, *shape) if self.fused and expert != SHARED else shape


@dataclass(frozen=True)
class MoeKeys:
    """The ``config.json`` keys of a mixture-of-experts model: expert count (the first of
    ``n_experts`` present: transformers 5 writes Qwen3-MoE's as ``num_local_experts``, the
    published configs as ``num_experts``), expert width,
    shared-expert width (None: no shared expert), and whether ``mlp_only_layers`` and
    ``decoder_sparse_step`` choose the sparse layers (else every layer is sparse).
    ``shared_count``: the key counting shared experts that are stored as one FFN of width
    ``count * d_expert`` (GLM-4-MoE's and DeepSeek's ``n_shared_experts``; 0: none), instead of
    ``d_shared``. ``first_dense``: the key counting the leading layers that keep a dense FFN
    (``first_k_dense_replace``: layers ``0 .. n-1`` dense, the rest sparse). ``interleave``:
    the sparse layers are ``moe_layers`` when listed, else every
    ``interleave_moe_layer_step``-th layer (``step - 1, 2 step - 1, ...``; Llama 4).
    ``switch``: the key that must be ``true`` for the model to have experts at all (Gemma 4's
    ``enable_moe_block``; else it is dense)."""

    n_experts: tuple[str, ...]
    d_expert: str
    d_shared: str | None = None
    sparse_step: bool = False
    shared_count: str | None = None
    first_dense: str | None = None
    interleave: bool = False
    switch: str | None = None


@dataclass(frozen=True)
class LatentDims:
    """Multi-head latent attention (DeepSeek-V2/V3 MLA): query LoRA rank ``q_rank`` (0: no
    query LoRA, one ``q_proj``), key/value latent rank ``kv_rank``, each head's no-RoPE and
    RoPE query/key widths ``nope`` and ``rope`` (``ModelDims.d_head = nope + rope``) and its
    value width ``d_value``. Shapes (nn.Linear, out x in): ``W_DQ (q_rank, d)``, ``W_UQ (h
    d_head, q_rank)`` (or ``W_Q (h d_head, d)``), ``[W_DKV; W_KR] (kv_rank + rope, d)``,
    ``W_UK_i (nope, kv_rank)``, ``W_UV_i (d_value, kv_rank)``, ``W_O (d, h d_value)``."""

    q_rank: int
    kv_rank: int
    nope: int
    rope: int
    d_value: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class LatentLayout:
    """Where a latent-attention layer's tensors live (names after the layer prefix).

    ``q_a`` ``(q_rank, d)`` = W_DQ, ``q_b`` ``(h d_head, q_rank)`` = W_UQ (head ``i``'s rows
    ``[i d_head, (i+1) d_head)``: ``nope`` no-RoPE then ``rope`` RoPE rows), or without a query
    LoRA ``q`` ``(h d_head, d)``; ``kv_a`` ``(kv_rank + rope, d)`` = ``[W_DKV; W_KR]``; ``kv_b``
    ``(h (nope + d_value), kv_rank)``, per head ``[W_UK_i; W_UV_i]`` (Hugging Face), or with
    ``split_kv_b`` llama.cpp's ``k_b`` ``(h, kv_rank, nope)`` (each ``W_UK_i^T``) and ``v_b``
    ``(h, d_value, kv_rank)``; ``o`` ``(d, h d_value)``. ``q_norm``, ``kv_norm``: the RMSNorm
    gains on the query and key/value latents (``q_a_layernorm``, ``kv_a_layernorm``)."""

    q_a: str
    q_b: str
    q: str
    kv_a: str
    kv_b: str
    o: str
    q_norm: str
    kv_norm: str
    split_kv_b: tuple[str, str] | None = None


@dataclass(frozen=True)
class Adapter:
    """Tensor layout of one architecture.

    ``norms`` maps a norm role to its tensor (after the layer prefix): ``attn`` (input of
    W_Q, W_K, W_V), ``ffn`` (input of the FFN projections), ``q``/``k`` (QK-norm gains).
    ``qk_norm``: what a QK-norm normalizes, ``"head"`` (each head's ``d_head`` outputs, a
    gain of ``d_head``: Qwen3, Gemma 3) or ``"projection"`` (all of W_Q's or W_K's outputs at
    once, a gain of ``h * d_head`` or ``n_kv * d_head``: OLMo 2). ``also_prefixes``: other
    layer prefixes the same layout is saved under (tried in order when ``layer_prefix`` has no
    W_Q). ``experts``: a mixture-of-experts model's expert layouts (tried in order: the first
    whose router is stored), whose sparse layers have no W_gate/W_up/W_down of their own.
    ``qk_norm_key``: the ``config.json`` key that switches QK-norm on (GLM-4-MoE's
    ``use_qk_norm``; :meth:`configured` drops the ``q``/``k`` norms where it is not true).
    ``latent``: multi-head latent attention's tensors (DeepSeek), read by
    :mod:`latent_attention`; ``weights`` then holds the FFN's alone, and W_Q, W_K, W_V, W_O
    are the effective per-head projections formed from the latent factors.
    """

    layer_prefix: str
    weights: dict[str, WeightSpec]
    ffn_input: str = "W_gate"
    norms: dict[str, str] = field(default_factory=dict)
    norm_offset: float = 0.0
    qk_norm: str = "head"
    also_prefixes: tuple[str, ...] = ()
    experts: tuple[ExpertLayout, ...] = ()
    qk_norm_key: str | None = None
    latent: LatentLayout | None = None

    def configured(self, config: dict) -> Adapter:
        """This layout for a model whose ``config.json`` is ``config``: without its QK-norm
        gains where ``qk_norm_key`` is not ``true`` there."""
        if self.qk_norm_key is None or config.get(self.qk_norm_key) is True:
            return self
        return replace(self, norms={r: n for r, n in self.norms.items() if r not in ("q", "k")})

    @property
    def weight_types(self) -> tuple[str, ...]:
        return (*(LATENT_WEIGHTS if self.latent else ()), *self.weights)

    def kernel_tensors(self, layer: int, query_lora: bool = True) -> tuple[str, str]:
        """The stored tensors holding ``layer``'s W_Q and W_K (for messages; under latent
        attention its query projection, ``q_b`` or without a query LoRA ``q``, and its
        key/value down-projection)."""
        if self.latent is None:
            return self.tensor_name("W_Q", layer), self.tensor_name("W_K", layer)
        prefix = self.layer_prefix.format(layer=layer)
        query = self.latent.q_b if query_lora else self.latent.q
        return prefix + query, prefix + self.latent.kv_a

    def tensor_name(self, weight_type: str, layer: int) -> str:
        return self.layer_prefix.format(layer=layer) + self.weights[weight_type].tensor

    def norm_name(self, role: str, layer: int) -> str:
        return self.layer_prefix.format(layer=layer) + self.norms[role]

    @cached_property
    def _weight_name(self) -> re.Pattern:
        """Any per-layer weight tensor's name (as :meth:`tensor_name` builds them), the layer
        captured; compiled once per adapter."""
        head, _, tail = self.layer_prefix.partition("{layer}")
        names = [spec.tensor for spec in self.weights.values()]
        names += [self.latent.kv_a, self.latent.o] if self.latent else []
        tensors = "|".join(re.escape(name) for name in names)
        return re.compile(rf"{re.escape(head)}(\d+){re.escape(tail)}(?:{tensors})")

    def layer_of(self, name: str) -> int | None:
        """The layer of ``name`` when it is one of this layout's per-layer weight tensors, else
        None."""
        match = self._weight_name.fullmatch(name)
        return int(match[1]) if match else None

    def norm_size(self, role: str, dims: ModelDims) -> int:
        """Length of a norm gain: ``d`` for ``attn``/``ffn``, for ``q``/``k`` ``d_head`` or the
        whole projection's rows (see ``qk_norm``)."""
        if role not in ("q", "k"):
            return dims.d_model
        if self.qk_norm == "head":
            return dims.d_head
        return dims.weight_shape("W_Q" if role == "q" else "W_K")[0]

    def layouts(self) -> tuple[Adapter, ...]:
        """This layout under each of its layer prefixes, ``layer_prefix`` first."""
        return (self, *(replace(self, layer_prefix=p, also_prefixes=())
                        for p in self.also_prefixes))

    def without_model_prefix(self) -> Adapter:
        """This layout as a Hugging Face base model (``LlamaModel``, ``GPT2Model``) saves it,
        rather than its ``...ForCausalLM``: the layer prefix less its first part (``model.``,
        ``transformer.``, ``gpt_neox.``)."""
        return replace(self, layer_prefix=self.layer_prefix.partition(".")[2])


def _split(prefix_attn: str, prefix_mlp: str) -> dict[str, WeightSpec]:
    return {"W_Q": WeightSpec(f"{prefix_attn}q_proj.weight"),
            "W_K": WeightSpec(f"{prefix_attn}k_proj.weight"),
            "W_V": WeightSpec(f"{prefix_attn}v_proj.weight"),
            "W_O": WeightSpec(f"{prefix_attn}o_proj.weight"),
            "W_gate": WeightSpec(f"{prefix_mlp}gate_proj.weight"),
            "W_up": WeightSpec(f"{prefix_mlp}up_proj.weight"),
            "W_down": WeightSpec(f"{prefix_mlp}down_proj.weight")}


def _qkv_blocks(d: ModelDims) -> tuple[int, ...]:
    return d.n_heads * d.d_head, d.n_kv_heads * d.d_head, d.n_kv_heads * d.d_head


def _gate_up_blocks(d: ModelDims) -> tuple[int, ...]:
    return d.d_ff, d.d_ff


def _fused_qkv(tensor: str, transposed: bool = False) -> dict[str, WeightSpec]:
    """W_Q, W_K and W_V cut as row blocks from one fused ``[Q; K; V]`` tensor."""
    return {wt: WeightSpec(tensor, RowBlock(i, _qkv_blocks), transposed=transposed)
            for i, wt in enumerate(("W_Q", "W_K", "W_V"))}


def _fused_gate_up(tensor: str) -> dict[str, WeightSpec]:
    """W_gate and W_up cut as row blocks from one fused ``[gate; up]`` tensor (an expert's
    slice of a fused 3-D expert tensor too: its dimensions' ``d_ff`` is the expert's)."""
    return {wt: WeightSpec(tensor, RowBlock(i, _gate_up_blocks))
            for i, wt in enumerate(("W_gate", "W_up"))}


_LLAMA = _split("self_attn.", "mlp.")
_LLAMA_NORMS = {"attn": "input_layernorm.weight", "ffn": "post_attention_layernorm.weight"}
_QK_NORMS = {"q": "self_attn.q_norm.weight", "k": "self_attn.k_norm.weight"}

#: Architectures whose positions enter as learned absolute embeddings added to the residual
#: stream: no rotation acts inside their attention score (every other one here uses RoPE).
ABSOLUTE_POSITIONS = frozenset({"gpt2"})

#: Hugging Face ``config.model_type`` -> adapter.
HF_ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("model.layers.{layer}.", _LLAMA, norms=_LLAMA_NORMS),
    "mistral": Adapter("model.layers.{layer}.", _LLAMA, norms=_LLAMA_NORMS),
    "qwen2": Adapter("model.layers.{layer}.", _LLAMA, norms=_LLAMA_NORMS),
    "qwen3": Adapter("model.layers.{layer}.", _LLAMA, norms={**_LLAMA_NORMS, **_QK_NORMS}),
    "gemma": Adapter("model.layers.{layer}.", _LLAMA, norms=_LLAMA_NORMS, norm_offset=1.0),
    "gemma2": Adapter("model.layers.{layer}.", _LLAMA, norm_offset=1.0,
                      norms={"attn": "input_layernorm.weight",
                             "ffn": "pre_feedforward_layernorm.weight"}),
    "gemma3_text": Adapter("model.layers.{layer}.", _LLAMA, norm_offset=1.0, norms={
        "attn": "input_layernorm.weight", "ffn": "pre_feedforward_layernorm.weight",
        **_QK_NORMS}),
    # Gemma3ForConditionalGeneration's text tower (config.json's text_config), saved as
    # language_model.model.layers... (as published; transformers >= 5 saves it so), or as
    # model.language_model.layers... (transformers 4.5x's save_pretrained).
    "gemma3": Adapter("language_model.model.layers.{layer}.", _LLAMA, norm_offset=1.0,
                      also_prefixes=("model.language_model.layers.{layer}.",), norms={
                          "attn": "input_layernorm.weight",
                          "ffn": "pre_feedforward_layernorm.weight", **_QK_NORMS}),
    # OLMo 2 has no norm before its sublayers (post_attention_layernorm and
    # post_feedforward_layernorm normalize their outputs, before the residual sum): folding
    # puts only the QK-norm gains, over the whole projection, into W_Q's and W_K's rows.
    "olmo2": Adapter("model.layers.{layer}.", _LLAMA, norms=_QK_NORMS, qk_norm="projection"),
    # OLMo 3: OLMo 2's layout (sliding and full layers differ only in their mask).
    "olmo3": Adapter("model.layers.{layer}.", _LLAMA, norms=_QK_NORMS, qk_norm="projection"),
    # SmolLM3: Llama's layout; every no_rope_layer_interval-th layer NoPE (layer_kinds).
    "smollm3": Adapter("model.layers.{layer}.", _LLAMA, norms=_LLAMA_NORMS),
    "phi3": Adapter("model.layers.{layer}.", {
        **_fused_qkv("self_attn.qkv_proj.weight"),
        "W_O": WeightSpec("self_attn.o_proj.weight"),
        **_fused_gate_up("mlp.gate_up_proj.weight"),
        "W_down": WeightSpec("mlp.down_proj.weight"),
    }, norms=_LLAMA_NORMS),
    "gpt2": Adapter("transformer.h.{layer}.", {
        **_fused_qkv("attn.c_attn.weight", transposed=True),
        "W_O": WeightSpec("attn.c_proj.weight", transposed=True),
        "W_up": WeightSpec("mlp.c_fc.weight", transposed=True),
        "W_down": WeightSpec("mlp.c_proj.weight", transposed=True),
    }, ffn_input="W_up", norms={"attn": "ln_1.weight", "ffn": "ln_2.weight"}),
    "gpt_neox": Adapter("gpt_neox.layers.{layer}.", {
        "W_Q": WeightSpec("attention.query_key_value.weight", HeadInterleaved(0)),
        "W_K": WeightSpec("attention.query_key_value.weight", HeadInterleaved(1)),
        "W_V": WeightSpec("attention.query_key_value.weight", HeadInterleaved(2)),
        "W_O": WeightSpec("attention.dense.weight"),
        "W_up": WeightSpec("mlp.dense_h_to_4h.weight"),
        "W_down": WeightSpec("mlp.dense_4h_to_h.weight"),
    }, ffn_input="W_up", norms=_LLAMA_NORMS),
}


def _per_expert(prefix: str, gate: str, up: str, down: str) -> dict[str, WeightSpec]:
    return {"W_gate": WeightSpec(f"{prefix}{gate}.weight"),
            "W_up": WeightSpec(f"{prefix}{up}.weight"),
            "W_down": WeightSpec(f"{prefix}{down}.weight")}


#: Experts as transformers >= 5 holds them in memory (and as checkpoints written from its state
#: dict store them): 3-D tensors, one slice per expert, under ``mlp.``.
_FUSED_EXPERTS = ExpertLayout("mlp.gate.weight", {
    **_fused_gate_up("mlp.experts.gate_up_proj"),
    "W_down": WeightSpec("mlp.experts.down_proj")}, fused=True)
_QWEN_EXPERTS = _per_expert("mlp.experts.{expert}.", "gate_proj", "up_proj", "down_proj")
_QWEN2_SHARED = _per_expert("mlp.shared_expert.", "gate_proj", "up_proj", "down_proj")
_QWEN2_SHARED_GATE = "mlp.shared_expert_gate.weight"
#: gpt-oss's experts: fused, W_gate and W_up interleaved in rows (out, in) (in columns of the
#: ``x @ W`` tensors transformers holds), router ``mlp.router``. As published (openai/gpt-oss-*):
#: MXFP4, ``*_blocks`` ``(E, out, in / 32, 16)`` + ``*_scales`` ``(E, out, in / 32)``, read as
#: one ``(E, out, in)`` tensor (:mod:`mxfp4`); as transformers >= 5 saves it: ``gate_up_proj``
#: ``(E, d, 2 d_ff)`` and ``down_proj`` ``(E, d_ff, d)``, both ``x @ W``, hence transposed.
_GPT_OSS_MXFP4 = ExpertLayout("mlp.router.weight", {
    "W_gate": WeightSpec("mlp.experts.gate_up_proj_blocks", RowInterleaved(0)),
    "W_up": WeightSpec("mlp.experts.gate_up_proj_blocks", RowInterleaved(1)),
    "W_down": WeightSpec("mlp.experts.down_proj_blocks")}, fused=True)
_GPT_OSS_DENSE = ExpertLayout("mlp.router.weight", {
    "W_gate": WeightSpec("mlp.experts.gate_up_proj", RowInterleaved(0), transposed=True),
    "W_up": WeightSpec("mlp.experts.gate_up_proj", RowInterleaved(1), transposed=True),
    "W_down": WeightSpec("mlp.experts.down_proj", transposed=True)}, fused=True)
_GLM_SHARED = _per_expert("mlp.shared_experts.", "gate_proj", "up_proj", "down_proj")
#: Mixture-of-experts layouts of each MoE ``model_type``: one tensor per expert (what
#: ``save_pretrained`` writes, transformers 4 and 5), then the fused 3-D tensors.
_MOE_LAYOUTS = {
    "mixtral": (ExpertLayout("block_sparse_moe.gate.weight", _per_expert(
        "block_sparse_moe.experts.{expert}.", "w1", "w3", "w2")), _FUSED_EXPERTS),
    "qwen2_moe": (ExpertLayout("mlp.gate.weight", _QWEN_EXPERTS, shared=_QWEN2_SHARED,
                               shared_gate=_QWEN2_SHARED_GATE),
                  replace(_FUSED_EXPERTS, shared=_QWEN2_SHARED,
                          shared_gate=_QWEN2_SHARED_GATE)),
    "qwen3_moe": (ExpertLayout("mlp.gate.weight", _QWEN_EXPERTS), _FUSED_EXPERTS),
    "olmoe": (ExpertLayout("mlp.gate.weight", _QWEN_EXPERTS), _FUSED_EXPERTS),
    "gpt_oss": (_GPT_OSS_MXFP4, _GPT_OSS_DENSE),
    # GLM-4-MoE: the shared experts are one FFN (mlp.shared_experts); the router's
    # e_score_correction_bias (a per-expert bias for the top-k choice) is not read.
    "glm4_moe": (ExpertLayout("mlp.gate.weight", _QWEN_EXPERTS, shared=_GLM_SHARED),
                 replace(_FUSED_EXPERTS, shared=_GLM_SHARED)),
}
_MOE_LAYOUTS["minimax_m2"] = _MOE_LAYOUTS["mixtral"]  # its e_score_correction_bias unread
_GPT_OSS_NOT_USED = (
    "attention sinks (one learned logit per head, a column every query attends to with no"
    " value: it lowers how much a head attends to the tokens, not its W_Q^T W_K or W_O W_V"
    " maps) and the router's and experts' biases are not used")
#: Architecture (``model_type`` or GGUF ``general.architecture``) -> its parameters, beyond
#: biases and norms, that the geometry leaves out (``model.json``'s ``not_used``).
NOT_USED = {"gpt_oss": _GPT_OSS_NOT_USED, "gpt-oss": _GPT_OSS_NOT_USED,
            **dict.fromkeys(GEMMA4_TYPES, GEMMA4_NOT_USED)}
#: ``model_type`` -> its mixture-of-experts config keys (:func:`moe_dims_from_hf_config`).
HF_MOE_KEYS = {
    "mixtral": MoeKeys(("num_local_experts",), "intermediate_size"),
    "qwen2_moe": MoeKeys(("num_experts",), "moe_intermediate_size",
                         "shared_expert_intermediate_size", sparse_step=True),
    "qwen3_moe": MoeKeys(("num_experts", "num_local_experts"), "moe_intermediate_size",
                         sparse_step=True),
    "olmoe": MoeKeys(("num_experts",), "intermediate_size"),
    "gpt_oss": MoeKeys(("num_local_experts",), "intermediate_size"),
    "glm4_moe": MoeKeys(("n_routed_experts",), "moe_intermediate_size",
                        shared_count="n_shared_experts", first_dense="first_k_dense_replace"),
    "minimax_m2": MoeKeys(("num_local_experts",), "intermediate_size"),
}
HF_ADAPTERS.update({
    "mixtral": Adapter("model.layers.{layer}.", _LLAMA, norms=_LLAMA_NORMS,
                       experts=_MOE_LAYOUTS["mixtral"]),
    # Dense layers (mlp_only_layers, decoder_sparse_step) are Llama's mlp.*_proj.
    "qwen2_moe": Adapter("model.layers.{layer}.", _LLAMA, norms=_LLAMA_NORMS,
                         experts=_MOE_LAYOUTS["qwen2_moe"]),
    "qwen3_moe": Adapter("model.layers.{layer}.", _LLAMA, norms={**_LLAMA_NORMS, **_QK_NORMS},
                         experts=_MOE_LAYOUTS["qwen3_moe"]),
    # OLMoE: pre-norms as Llama's, QK-norm over the whole projection as OLMo 2's.
    "olmoe": Adapter("model.layers.{layer}.", _LLAMA, norms={**_LLAMA_NORMS, **_QK_NORMS},
                     qk_norm="projection", experts=_MOE_LAYOUTS["olmoe"]),
    # gpt-oss: q/k/v/o_proj have biases and each head an attention sink (NOT_USED), neither
    # read; every layer sparse.
    "gpt_oss": Adapter("model.layers.{layer}.", _LLAMA, norms=_LLAMA_NORMS,
                       experts=_MOE_LAYOUTS["gpt_oss"]),
    # GLM-4-MoE: dense first layers (Llama's mlp.*_proj), per-head QK-norm where use_qk_norm
    # (GLM-4.5; not GLM-4.5-Air), partial rotary (positions do not change the weights).
    "glm4_moe": Adapter("model.layers.{layer}.", _LLAMA, norms={**_LLAMA_NORMS, **_QK_NORMS},
                        qk_norm_key="use_qk_norm", experts=_MOE_LAYOUTS["glm4_moe"]),
    # MiniMax-M2: every layer sparse, Mixtral's layout; QK-norm over the whole projection.
    "minimax_m2": Adapter("model.layers.{layer}.", _LLAMA,
                          norms={**_LLAMA_NORMS, **_QK_NORMS}, qk_norm="projection",
                          experts=_MOE_LAYOUTS["minimax_m2"]),
})

#: Gemma 4 (gemma4.py: per-layer head sizes, key/value reuse; RMSNorm gains as stored). Its
#: mixture of experts (``enable_moe_block``): every layer has routed experts (fused, nn.Linear
#: orientation) reading their own pre-FFN norm (``experts``) beside its dense FFN, read as the
#: shared expert (``ffn``); the router ``router.proj`` reads the normalized stream times
#: ``router.scale`` (``router``).
_GEMMA4_NORMS = {"attn": "input_layernorm.weight", "ffn": "pre_feedforward_layernorm.weight",
                 **_QK_NORMS, "experts": "pre_feedforward_layernorm_2.weight",
                 "router": "router.scale"}
_GEMMA4_EXPERTS = ExpertLayout("router.proj.weight", {
    **_fused_gate_up("experts.gate_up_proj"), "W_down": WeightSpec("experts.down_proj")},
    fused=True, shared=_per_expert("mlp.", "gate_proj", "up_proj", "down_proj"))
_GEMMA4 = Adapter("model.layers.{layer}.", _LLAMA, norms=_GEMMA4_NORMS,
                  experts=(_GEMMA4_EXPERTS,))
HF_ADAPTERS.update({
    "gemma4_text": _GEMMA4,
    # Gemma4ForConditionalGeneration's text tower (config.json's text_config).
    "gemma4": replace(_GEMMA4, layer_prefix="model.language_model.layers.{layer}.",
                      also_prefixes=("language_model.model.layers.{layer}.",)),
})
HF_MOE_KEYS.update(dict.fromkeys(GEMMA4_TYPES, MoeKeys(
    ("num_experts",), "moe_intermediate_size", "intermediate_size", switch="enable_moe_block")))
#: Norm roles that only a sparse layer has (a dense layer has no such gains).
EXPERT_NORMS = ("experts", "router")

#: Llama 4: experts fused in ``x @ W`` orientation, hence transposed: ``gate_up_proj``
#: ``(E, d, 2 d_ff)`` (gate = the first d_ff columns), ``down_proj`` ``(E, d_ff, d)``; the router
#: ``feed_forward.router`` ``(E, d)`` (its sigmoid scores scale each expert's input); a shared
#: expert of the experts' width. Dense layers (``moe_layers``, ``interleave_moe_layer_step``)
#: have Llama's FFN under ``feed_forward.``, of width ``intermediate_size_mlp``. The weightless
#: per-head RMS norm of q and k on its RoPE layers (``use_qk_norm``) has no gain to fold.
_LLAMA4_EXPERTS = ExpertLayout("feed_forward.router.weight", {
    **{wt: replace(spec, transposed=True)
       for wt, spec in _fused_gate_up("feed_forward.experts.gate_up_proj").items()},
    "W_down": WeightSpec("feed_forward.experts.down_proj", transposed=True)}, fused=True,
    shared=_per_expert("feed_forward.shared_expert.", "gate_proj", "up_proj", "down_proj"))
HF_MOE_KEYS["llama4_text"] = MoeKeys(("num_local_experts",), "intermediate_size",
                                     "intermediate_size", interleave=True)
HF_ADAPTERS["llama4_text"] = Adapter("model.layers.{layer}.",
                                     _split("self_attn.", "feed_forward."),
                                     norms=_LLAMA_NORMS, experts=(_LLAMA4_EXPERTS,))
#: Llama4ForConditionalGeneration (``llama4``, the published Llama 4 checkpoints): its text
#: tower (``text_config``) under ``language_model.model.layers``.
HF_ADAPTERS["llama4"] = replace(HF_ADAPTERS["llama4_text"],
                                layer_prefix="language_model.model.layers.{layer}.")
HF_MOE_KEYS["llama4"] = HF_MOE_KEYS["llama4_text"]

#: Hybrids (Qwen3.5, its MoE, Qwen3-Next): gated-DeltaNet linear-attention layers
#: (``linear_attn.*``, never read; :mod:`layer_kinds` says which layers they are)
#: between full-attention layers (``self_attn.*``) whose ``q_proj`` holds each head's query
#: rows and then its output gate's (:class:`HeadInterleaved`, ``parts=2``); QK-norm per head;
#: every RMSNorm scales by ``1 + w``. Experts as Qwen2-MoE's (router ``mlp.gate``, a shared
#: expert whose ``shared_expert_gate`` is not part of the FFN input).
_GATED_QUERY = {**_LLAMA,
                "W_Q": WeightSpec("self_attn.q_proj.weight", HeadInterleaved(0, parts=2))}
_HYBRID = Adapter("model.layers.{layer}.", _GATED_QUERY, norms={**_LLAMA_NORMS, **_QK_NORMS},
                  norm_offset=1.0)
#: The multimodal Qwen3.5 (Qwen3_5ForConditionalGeneration): its text tower's layers.
_TOWER = "model.language_model.layers.{layer}."
HF_ADAPTERS.update({
    "qwen3_5_text": _HYBRID,
    "qwen3_5": replace(_HYBRID, layer_prefix=_TOWER),
    "qwen3_5_moe_text": replace(_HYBRID, experts=_MOE_LAYOUTS["qwen2_moe"]),
    "qwen3_5_moe": replace(_HYBRID, layer_prefix=_TOWER, experts=_MOE_LAYOUTS["qwen2_moe"]),
    "qwen3_next": replace(_HYBRID, experts=_MOE_LAYOUTS["qwen2_moe"]),
})
_QWEN_HYBRID_MOE = MoeKeys(("num_experts",), "moe_intermediate_size",
                           "shared_expert_intermediate_size")
HF_MOE_KEYS.update({"qwen3_5_moe_text": _QWEN_HYBRID_MOE, "qwen3_5_moe": _QWEN_HYBRID_MOE,
                    "qwen3_next": replace(_QWEN_HYBRID_MOE, sparse_step=True)})
#: ``model_type`` -> the key of ``ModelDims.d_ff`` where it is not ``intermediate_size``:
#: Qwen3.5-MoE has no dense FFN (every layer sparse, no ``intermediate_size``), so ``d_ff``
#: is its routed experts' width.
HF_FFN_WIDTH_KEY = {"qwen3_5_moe_text": "moe_intermediate_size",
                    "qwen3_5_moe": "moe_intermediate_size",
                    "llama4_text": "intermediate_size_mlp", "llama4": "intermediate_size_mlp"}
#: ``model_type`` of the hybrids -> transformers' ``full_attention_interval`` default (every
#: ``n``-th layer full attention, the others linear) where ``config.json`` has no
#: ``layer_types``.
HF_HYBRID_INTERVAL = dict.fromkeys(("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text",
                                    "qwen3_5_moe", "qwen3_next"), 4)

#: DeepSeek-V2/V3: multi-head latent attention (:class:`LatentLayout`), the first
#: ``first_k_dense_replace`` layers dense (Llama's mlp.*_proj), the others GLM-4-MoE's experts
#: (shared experts as one FFN, mlp.shared_experts; the router's e_score_correction_bias not
#: read). ``moe_layer_freq`` is ignored, as transformers ignores it (every published config
#: has 1).
_MLA = LatentLayout(
    q_a="self_attn.q_a_proj.weight", q_b="self_attn.q_b_proj.weight",
    q="self_attn.q_proj.weight", kv_a="self_attn.kv_a_proj_with_mqa.weight",
    kv_b="self_attn.kv_b_proj.weight", o="self_attn.o_proj.weight",
    q_norm="self_attn.q_a_layernorm.weight", kv_norm="self_attn.kv_a_layernorm.weight")
HF_LATENT = ("deepseek_v2", "deepseek_v3")
HF_MOE_KEYS.update(dict.fromkeys(HF_LATENT, MoeKeys(
    ("n_routed_experts",), "moe_intermediate_size", shared_count="n_shared_experts",
    first_dense="first_k_dense_replace")))
HF_ADAPTERS.update(dict.fromkeys(HF_LATENT, Adapter(
    "model.layers.{layer}.", {wt: _LLAMA[wt] for wt in EXPERT_WEIGHTS}, norms=_LLAMA_NORMS,
    experts=_MOE_LAYOUTS["glm4_moe"], latent=_MLA)))

_GGUF = {"W_Q": WeightSpec("attn_q.weight"), "W_K": WeightSpec("attn_k.weight"),
         "W_V": WeightSpec("attn_v.weight"), "W_O": WeightSpec("attn_output.weight"),
         "W_gate": WeightSpec("ffn_gate.weight"), "W_up": WeightSpec("ffn_up.weight"),
         "W_down": WeightSpec("ffn_down.weight")}
_GGUF_NORMS = {"attn": "attn_norm.weight", "ffn": "ffn_norm.weight"}

_GGUF_QK_NORMS = {"q": "attn_q_norm.weight", "k": "attn_k_norm.weight"}

#: GGUF ``general.architecture`` -> adapter: the tensors llama.cpp's ``convert_hf_to_gguf.py``
#: writes, whose layout differs from Hugging Face's in three ways, undone here. (1) It permutes
#: the rows of W_Q/W_K of the ``llama`` family (``LlamaModel.permute``) for its RoPE layout;
#: :data:`GGUF_ROPE_PERMUTED` lists those (not Gemma, Qwen, Phi-3, GPT-2). (2) It stores
#: Gemma's norm gains as ``1 + w`` (``GemmaModel``, ``Gemma2Model``, ``Gemma3Model``
#: ``modify_tensors``), the gain itself: no ``norm_offset`` here. (3) It transposes GPT-2's
#: ``Conv1D`` weights to ``(out, in)`` (``GPT2Model.modify_tensors``): none is transposed here.
#: Fused tensors keep Hugging Face's rows: Phi-3's ``attn_qkv`` is [Q | K | V] and its
#: ``ffn_up`` [gate | up]; GPT-2's ``attn_qkv`` is [Q | K | V].
GGUF_ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("blk.{layer}.", _GGUF, norms=_GGUF_NORMS),
    "mistral": Adapter("blk.{layer}.", _GGUF, norms=_GGUF_NORMS),
    "qwen2": Adapter("blk.{layer}.", _GGUF, norms=_GGUF_NORMS),
    "qwen3": Adapter("blk.{layer}.", _GGUF, norms={**_GGUF_NORMS, **_GGUF_QK_NORMS}),
    "gemma": Adapter("blk.{layer}.", _GGUF, norms=_GGUF_NORMS),
    # ffn_norm is pre_feedforward_layernorm; post_attention_norm and post_ffw_norm act on the
    # sublayers' outputs and are not folded (as for the Hugging Face checkpoint).
    "gemma2": Adapter("blk.{layer}.", _GGUF, norms=_GGUF_NORMS),
    "gemma3": Adapter("blk.{layer}.", _GGUF, norms={**_GGUF_NORMS, **_GGUF_QK_NORMS}),
    "phi3": Adapter("blk.{layer}.", {
        **_fused_qkv("attn_qkv.weight"),
        "W_O": WeightSpec("attn_output.weight"),
        **_fused_gate_up("ffn_up.weight"),
        "W_down": WeightSpec("ffn_down.weight"),
    }, norms=_GGUF_NORMS),
    "gpt2": Adapter("blk.{layer}.", {
        **_fused_qkv("attn_qkv.weight"),
        "W_O": WeightSpec("attn_output.weight"),
        "W_up": WeightSpec("ffn_up.weight"),
        "W_down": WeightSpec("ffn_down.weight"),
    }, ffn_input="W_up", norms=_GGUF_NORMS),
}
#: The mixture-of-experts tensors llama.cpp's converter writes, whatever the architecture: each
#: expert's ``(out, in)`` weights stacked into 3-D ``ffn_{gate,up,down}_exps`` ``(E, out, in)``
#: (Hugging Face orientation after GGUF's reversed dimensions; quantized along rows, so expert
#: ``e`` is one contiguous byte range, read alone), the router ``ffn_gate_inp`` ``(E, d)``, a
#: shared expert ``ffn_{gate,up,down}_shexp`` and its gate ``ffn_gate_inp_shexp`` ``(1, d)``
#: (Qwen2-MoE). A layer is sparse where its router is stored (:func:`gguf_sparse_layers`).
GGUF_EXPERTS = ExpertLayout("ffn_gate_inp.weight", {
    "W_gate": WeightSpec("ffn_gate_exps.weight"), "W_up": WeightSpec("ffn_up_exps.weight"),
    "W_down": WeightSpec("ffn_down_exps.weight")}, fused=True, shared={
    "W_gate": WeightSpec("ffn_gate_shexp.weight"), "W_up": WeightSpec("ffn_up_shexp.weight"),
    "W_down": WeightSpec("ffn_down_shexp.weight")}, shared_gate="ffn_gate_inp_shexp.weight")
#: The same with each expert's W_gate and W_up fused, ``ffn_gate_up_exps`` ``(E, 2 d_e, d)``,
#: rows [gate; up] (the converter's ``--fuse-gate-up-exps``); chosen where it is stored.
GGUF_GATE_UP_EXPERTS = replace(GGUF_EXPERTS, experts={
    **_fused_gate_up("ffn_gate_up_exps.weight"), "W_down": WeightSpec("ffn_down_exps.weight")})
#: Or one 2-D tensor per expert, ``ffn_{gate,up,down}.{expert}.weight``: llama.cpp's first
#: Mixtral files (December 2023), which its loader still reads.
GGUF_PER_EXPERT = replace(GGUF_EXPERTS, fused=False, experts={
    wt: WeightSpec(f"ffn_{part}.{{expert}}.weight")
    for wt, part in (("W_gate", "gate"), ("W_up", "up"), ("W_down", "down"))})
_GGUF_MOE = (GGUF_EXPERTS, GGUF_GATE_UP_EXPERTS, GGUF_PER_EXPERT)
GGUF_ADAPTERS.update({
    # Mixtral is written as llama (RoPE-permuted Q/K rows) with ffn_*_exps tensors.
    "llama": replace(GGUF_ADAPTERS["llama"], experts=_GGUF_MOE),
    "qwen2moe": Adapter("blk.{layer}.", _GGUF, norms=_GGUF_NORMS, experts=_GGUF_MOE),
    "qwen3moe": Adapter("blk.{layer}.", _GGUF, norms={**_GGUF_NORMS, **_GGUF_QK_NORMS},
                        experts=_GGUF_MOE),
    "olmoe": Adapter("blk.{layer}.", _GGUF, norms={**_GGUF_NORMS, **_GGUF_QK_NORMS},
                     qk_norm="projection", experts=_GGUF_MOE),
    # gpt-oss: the pre-FFN norm (HF post_attention_layernorm) is post_attention_norm; its
    # experts as above (W_gate and W_up de-interleaved by the converter), MXFP4 as published.
    "gpt-oss": Adapter("blk.{layer}.", _GGUF, experts=_GGUF_MOE, norms={
        "attn": "attn_norm.weight", "ffn": "post_attention_norm.weight"}),
})
#: GLM-4-MoE (``glm4moe``): the pre-FFN norm is post_attention_norm; attn_q_norm/attn_k_norm
#: per head where the model has QK-norm (``use_qk_norm``: read off the stored tensors); no
#: shared-expert gate; ``block_count`` counts the multi-token-prediction layers too
#: (``nextn_predict_layers``, stored last, not read). MiniMax-M2 (``minimax-m2``): QK-norm over
#: the whole projection. Neither permutes W_Q/W_K; both write ``rope.dimension_count`` (the
#: rotated share of ``key_length``: partial rotary).
GGUF_ADAPTERS.update({
    "glm4moe": Adapter("blk.{layer}.", _GGUF, qk_norm_key="use_qk_norm", norms={
        "attn": "attn_norm.weight", "ffn": "post_attention_norm.weight", **_GGUF_QK_NORMS},
        experts=(replace(GGUF_EXPERTS, shared_gate=None),)),
    "minimax-m2": Adapter("blk.{layer}.", _GGUF, norms={**_GGUF_NORMS, **_GGUF_QK_NORMS},
                          qk_norm="projection", experts=(GGUF_EXPERTS,)),
})
#: Architectures whose ``{arch}.rope.dimension_count`` may be less than ``key_length``.
GGUF_PARTIAL_ROTARY = ("glm4moe", "minimax-m2", "qwen35", "qwen35moe", "qwen3next")
#: DeepSeek-V2/V3 as llama.cpp's ``DeepseekV2Model`` writes them (``deepseek2``): latent
#: attention under ``attn_q_a``, ``attn_q_b`` (``attn_q`` without a query LoRA),
#: ``attn_kv_a_mqa``, ``attn_output``, the latents' gains ``attn_q_a_norm``,
#: ``attn_kv_a_norm``; ``kv_b_proj`` split into ``attn_k_b`` ``(h, kv_rank, nope)`` (each
#: head's ``W_UK_i`` transposed) and ``attn_v_b`` ``(h, d_value, kv_rank)``, put back together
#: on reading (files written before that split hold ``attn_kv_b``, Hugging Face's layout); no
#: RoPE permutation. Leading dense layers (``leading_dense_block_count``) have ``ffn_gate``
#: etc., the others :data:`GGUF_EXPERTS` (no shared-expert gate).
_GGUF_MLA = LatentLayout(
    q_a="attn_q_a.weight", q_b="attn_q_b.weight", q="attn_q.weight",
    kv_a="attn_kv_a_mqa.weight", kv_b="attn_kv_b.weight", o="attn_output.weight",
    q_norm="attn_q_a_norm.weight", kv_norm="attn_kv_a_norm.weight",
    split_kv_b=("attn_k_b.weight", "attn_v_b.weight"))
GGUF_LATENT = ("deepseek2",)
GGUF_ADAPTERS["deepseek2"] = Adapter(
    "blk.{layer}.", {wt: _GGUF[wt] for wt in EXPERT_WEIGHTS}, norms=_GGUF_NORMS,
    experts=(replace(GGUF_EXPERTS, shared_gate=None),), latent=_GGUF_MLA)
#: SmolLM3 (``smollm3``): Llama's tensors, W_Q/W_K RoPE-permuted (the converter's
#: ``SmolLM3Model`` is a ``LlamaModel``); NoPE every 4th layer (:mod:`layer_kinds`). OLMo 2 and
#: OLMo 3 (both ``olmo2``, ``Olmo2Model``): QK-norm over the whole projection (``attn_q_norm``,
#: ``attn_k_norm``), no norm before the sublayers, no permutation; OLMo 3's sliding layers in
#: ``sliding_window_pattern``. Llama 4 (``llama4``): no permutation (``undo_permute = False``:
#: its RoPE pairs adjacent coordinates already); the converter splits and transposes its fused
#: ``x @ W`` experts into :data:`GGUF_EXPERTS`' ``(out, in)`` stacks; its shared expert
#: ``ffn_*_shexp`` has no gate and no key of its own (llama.cpp makes it ``n_ff_exp`` wide:
#: :data:`GGUF_SHARED_AS_WIDE_AS_EXPERTS`); the dense layers' ``feed_forward_length`` is
#: ``intermediate_size_mlp``.
GGUF_ADAPTERS.update({
    "smollm3": Adapter("blk.{layer}.", _GGUF, norms=_GGUF_NORMS),
    "olmo2": Adapter("blk.{layer}.", _GGUF, norms=_GGUF_QK_NORMS, qk_norm="projection"),
    "llama4": Adapter("blk.{layer}.", _GGUF, norms=_GGUF_NORMS,
                      experts=(replace(GGUF_EXPERTS, shared_gate=None),)),
})
GGUF_SHARED_AS_WIDE_AS_EXPERTS = ("llama4",)
GGUF_ROPE_PERMUTED = {"llama", "mistral", "smollm3"}
#: Hybrids as llama.cpp's ``Qwen3NextModel``, ``Qwen3_5TextModel``, ``Qwen3_5MoeTextModel``
#: write them: ``attn_q`` is Hugging Face's gated ``q_proj`` (rows unchanged: each head's
#: query, then its gate), every ``*norm.weight`` stored as ``1 + w`` (the gain: no
#: ``norm_offset``), the pre-FFN norm is ``post_attention_norm``, experts as
#: :data:`GGUF_EXPERTS`; ``linear_attn.*`` (``attn_qkv``, ``attn_gate``, ``ssm_*``) not read.
#: The full-attention layers: every ``{arch}.full_attention_interval``-th (:mod:`layer_kinds`).
_GGUF_HYBRID = Adapter("blk.{layer}.", {
    **_GGUF, "W_Q": WeightSpec("attn_q.weight", HeadInterleaved(0, parts=2))}, norms={
    "attn": "attn_norm.weight", "ffn": "post_attention_norm.weight", **_GGUF_QK_NORMS})
GGUF_ADAPTERS.update({"qwen35": _GGUF_HYBRID,
                      "qwen35moe": replace(_GGUF_HYBRID, experts=(GGUF_EXPERTS,)),
                      "qwen3next": replace(_GGUF_HYBRID, experts=(GGUF_EXPERTS,))})
#: GGUF ``general.architecture`` -> the key of ``ModelDims.d_ff`` where it is not
#: ``feed_forward_length``: Qwen3.5-MoE has no dense FFN.
GGUF_FFN_WIDTH_KEY = {"qwen35moe": "expert_feed_forward_length"}
#: Gemma 4 (``gemma4``) as llama.cpp's converter writes it (``Gemma4Model``, a
#: ``Gemma3Model`` whose ``norm_shift`` is 0): every ``*norm.weight`` stored as the gain ``w``
#: itself (Gemma 4's RMSNorm multiplies by ``w``), ``ffn_norm`` the pre-FFN norm
#: (``pre_feedforward_layernorm``), QK-norm gains per head (``attn_q_norm``, ``attn_k_norm``);
#: a layer that reuses another's keys and values stores no ``attn_k``/``attn_v``/``attn_k_norm``,
#: one whose values are its keys no ``attn_v`` (:func:`gemma4.gguf_kv_reuse`); per-layer sizes
#: in the metadata (:func:`_gguf_per_layer_dims`). Not read: ``post_attention_norm``,
#: ``post_ffw_norm``, ``layer_output_scale``, the per-layer input embeddings (``inp_gate``,
#: ``proj``, ``post_norm``, ``per_layer_*``); ``rope_freqs`` only for the share of pairs the
#: global layers' RoPE turns (:func:`gemma4.gguf_rotary_fractions`). No RoPE permutation.
#:
#: Its mixture of experts as the converter writes it (``Gemma4Model.filter_tensors`` and
#: ``modify_tensors``, ``conversion/gemma.py``; gguf-py's name map) and llama.cpp's loader and
#: graph read it (``llama_model_gemma4::load_arch_tensors``, ``src/models/gemma4.cpp``): a layer
#: is sparse where ``ffn_gate_inp`` (``router.proj``, ``(E, d)``) is stored; its routed experts
#: are ``ffn_gate_up_exps`` ``(E, 2 d_e, d)`` (``experts.gate_up_proj``, gate rows first: the
#: graph's ``gate_up_exps``) and ``ffn_down_exps`` ``(E, d, d_e)``, reading the stream through
#: ``pre_ffw_norm_2`` (``pre_feedforward_layernorm_2``: the ``experts`` gain); the router reads
#: the gain-free normalized stream times ``ffn_gate_inp.scale`` (``router.scale``: the ``router``
#: gain) and ``1 / sqrt(d)``; the dense ``ffn_gate``/``ffn_up``/``ffn_down`` beside the experts
#: (the graph's "MLP (shared exp)", reading ``ffn_norm``) is their ``shared`` expert, as in the
#: Hugging Face layout. Not read, as there: ``ffn_down_exps.scale`` (``router.per_expert_scale``,
#: each expert's output scale), ``post_ffw_norm_1``, ``post_ffw_norm_2``.
_GGUF_GEMMA4_EXPERTS = replace(GGUF_GATE_UP_EXPERTS, shared_gate=None, shared={
    wt: _GGUF[wt] for wt in EXPERT_WEIGHTS})
GGUF_ADAPTERS["gemma4"] = Adapter("blk.{layer}.", _GGUF, norms={
    **_GGUF_NORMS, **_GGUF_QK_NORMS, "experts": "pre_ffw_norm_2.weight",
    "router": "ffn_gate_inp.scale"}, experts=(_GGUF_GEMMA4_EXPERTS,))
#: Architectures whose dense FFN runs beside the experts in every sparse layer, read as their
#: shared expert of width ``feed_forward_length`` (Gemma 4).
GGUF_SHARED_IS_DENSE_FFN = ("gemma4",)
#: Architectures whose head sizes, KV-head counts, FFN widths and key/value reuse may differ
#: per layer (Gemma 4).
GGUF_PER_LAYER_DIMS = ("gemma4",)


def unsupported(kind: str, name: str, supported) -> UserError:
    return UserError(f"{kind} architecture '{name}' is not supported (state-space and"
                     " encoder-only models are not, nor any decoder, dense or mixture of"
                     f" experts, outside this list); supported: {', '.join(sorted(supported))}")


#: ``model_type`` -> the ``config.json`` key holding its text model's config (a multimodal
#: model whose text tower is analysed).
HF_TEXT_CONFIG = {"gemma3": "text_config", "gemma4": "text_config", "qwen3_5": "text_config",
                  "qwen3_5_moe": "text_config", "llama4": "text_config"}
_GEMMA3_TEXT_DEFAULTS = {"hidden_size": 2304, "intermediate_size": 9216,
                         "num_hidden_layers": 26, "num_attention_heads": 8,
                         "num_key_value_heads": 4, "head_dim": 256}
#: ``model_type`` -> what transformers' config class takes for a key that ``config.json``
#: leaves out (Gemma 3's published configs omit the head counts and ``head_dim``):
#: ``Gemma3TextConfig``'s defaults.
HF_CONFIG_DEFAULTS = {"gemma3_text": _GEMMA3_TEXT_DEFAULTS, "gemma3": _GEMMA3_TEXT_DEFAULTS,
                      "glm4_moe": {"first_k_dense_replace": 1, "n_shared_experts": 1,
                                   "num_nextn_predict_layers": 1,
                                   "partial_rotary_factor": 0.5}}
#: ``model_type`` -> the ``config.json`` key counting the multi-token-prediction layers that
#: published checkpoints store after the last decoder layer (GLM-4.5's ``model.layers.46``,
#: which transformers does not load either): allowed, not analysed.
HF_EXTRA_LAYERS = {"glm4_moe": "num_nextn_predict_layers"}
HF_EXTRA_LAYERS["deepseek_v3"] = "num_nextn_predict_layers"  # DeepSeek-V3's layer 61
def hf_layers_key(model_type: str) -> str:
    """The ``config.json`` key holding the number of layers."""
    if model_type in HF_TEXT_CONFIG:
        return f"{HF_TEXT_CONFIG[model_type]}.num_hidden_layers"
    return "n_layer" if model_type == "gpt2" else "num_hidden_layers"


def _check_kv_heads(h_key: str, h: int, kv_key: str, kv: int) -> None:
    """Grouped-query attention: each of the ``kv`` key/value heads serves ``h // kv`` query
    heads, so ``kv`` divides ``h``; a UserError naming both config keys otherwise."""
    if h % kv:
        raise UserError(f"{h_key}={h} is not a multiple of {kv_key}={kv} (allowed: {kv_key} a"
                        f" divisor of {h})")


def _even_d_head(d_key: str, d: int, h_key: str, h: int, head_dim_key: str | None,
                 where: str = "the config") -> int:
    """``d // h``, the head width of a config without an explicit one (``head_dim_key``, None
    where the format has none); a UserError naming the keys when ``h`` does not divide ``d``
    (the checkpoint's shapes would contradict any width)."""
    if d % h:
        lacks = f" and {where} has no {head_dim_key}" if head_dim_key else ""
        explicit = f", or a {head_dim_key}" if head_dim_key else ""
        raise UserError(f"{d_key}={d} is not divisible by {h_key}={h}{lacks} (allowed: {d_key}"
                        f" a multiple of {h_key}{explicit})")
    return d // h


def dims_from_hf_config(config: dict) -> ModelDims:
    """Dimensions from a Hugging Face ``config.json`` dict (GPT-2 names included).

    Each is an integer >= 1; an optional key (``head_dim``, ``num_key_value_heads``,
    ``n_inner``) that is absent or null takes its default, and so does any key of
    :data:`HF_CONFIG_DEFAULTS`. A multimodal model's come from its text config
    (:data:`HF_TEXT_CONFIG`; messages name its keys ``text_config.hidden_size``). A missing
    or bad value, a ``num_key_value_heads`` that does not divide ``num_attention_heads``, or
    a width that the heads do not split evenly when there is no ``head_dim``, is a UserError
    naming the keys (the caller adds the file).
    """

    model_type, where = config.get("model_type"), ""
    if model_type in HF_TEXT_CONFIG:
        where = HF_TEXT_CONFIG[model_type]
        if not isinstance(config.get(where), dict):
            raise UserError(f"no {where} object (the text model's config, needed for the"
                            " model's dimensions)")
        config, where = config[where], f"{where}."
    defaults = HF_CONFIG_DEFAULTS.get(model_type, {})
    config = {**defaults, **{k: v for k, v in config.items()
                             if not (v is None and k in defaults)}}

    def dim(key: str, default: int | None = None) -> int:
        return _hf_int(config, key, default, where)

    n_layers = dim("n_layer" if model_type == "gpt2" else "num_hidden_layers")
    if model_type == "gpt2":
        d, h = dim("n_embd"), dim("n_head")
        d_head = _even_d_head("n_embd", d, "n_head", h, None)
        return ModelDims(n_layers, d, dim("n_inner", 4 * d), h, h, d_head)
    d, h = dim("hidden_size"), dim("num_attention_heads")
    if model_type in HF_LATENT:  # every head its own key of nope + rope coordinates
        latent = latent_dims_from_hf_config(config)
        return ModelDims(n_layers, d, dim("intermediate_size"), h, h, latent.nope + latent.rope)
    n_kv = dim("num_key_value_heads", h)
    _check_kv_heads(f"{where}num_attention_heads", h, f"{where}num_key_value_heads", n_kv)
    d_head = (dim("head_dim", 0)  # 0: absent or null
              or _even_d_head(f"{where}hidden_size", d, f"{where}num_attention_heads", h,
                              f"{where}head_dim"))
    dims = ModelDims(
        n_layers=n_layers,
        d_model=d,
        d_ff=dim(HF_FFN_WIDTH_KEY.get(model_type, "intermediate_size")),
        n_heads=h,
        n_kv_heads=n_kv,
        d_head=d_head,
    )
    if model_type not in GEMMA4_TYPES:
        return dims
    layers = gemma4_layers(config, n_layers, where)
    return replace(dims, d_head=max(layers.head_dims), n_kv_heads=max(layers.kv_heads),
                   head_dims=layers.head_dims, kv_heads=layers.kv_heads,
                   ffn_widths=layers.ffn_widths)


def _hf_int(config: dict, key: str, default: int | None = None, where: str = "") -> int:
    """``config[key]``, an integer >= 1; ``default`` where it is absent or null (when given);
    else a UserError naming ``{where}{key}``."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if key not in config:
        raise UserError(f"no {where}{key} (needed for the model's dimensions)")
    if type(value) is not int or value < 1:  # not 2.5, "64", true or null
        raise UserError(f"{where}{key}: {value!r} is not allowed (an integer >= 1)")
    return value


def _latent_dims(q_rank: int, kv_rank: int, nope: int, rope: int, d_value: int,
                 value_key: str, head_keys: str) -> LatentDims:
    """:class:`LatentDims`; a UserError naming the keys where the value width exceeds the
    query/key width (the OV arrays have ``nope + rope`` rows per head)."""
    if d_value > nope + rope:
        raise UserError(f"{value_key} = {d_value} exceeds {head_keys} = {nope + rope} (allowed:"
                        " a value head no wider than the query/key head)")
    return LatentDims(q_rank, kv_rank, nope, rope, d_value)


def latent_dims_from_hf_config(config: dict) -> LatentDims | None:
    """The latent attention of a DeepSeek-V2/V3 ``config.json`` (:data:`HF_LATENT`), None for
    another ``model_type``: ``q_lora_rank`` (null: no query LoRA, 0), ``kv_lora_rank``,
    ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``. A missing or bad value is a
    UserError naming the key (the caller adds the file)."""
    if config.get("model_type") not in HF_LATENT:
        return None
    q_rank = 0 if config.get("q_lora_rank") is None else _hf_int(config, "q_lora_rank")
    return _latent_dims(q_rank, *(_hf_int(config, key) for key in (
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")),
        "v_head_dim", "qk_nope_head_dim + qk_rope_head_dim")


def rotary_fraction_from_hf_config(config: dict) -> float:
    """The share of each head's ``d_head`` coordinates that RoPE rotates (partial rotary:
    GLM-4-MoE, MiniMax-M2): ``rope_parameters.partial_rotary_factor`` (transformers 5), else
    ``partial_rotary_factor``, else ``rotary_dim / head_dim`` (MiniMax-M2's published configs),
    else the :data:`HF_CONFIG_DEFAULTS` value, else 1; a multimodal model's from its text
    config (:data:`HF_TEXT_CONFIG`: Qwen3.5's ``text_config``). A value outside ``(0, 1]`` is a
    UserError naming the key (the caller adds the file)."""
    default = HF_CONFIG_DEFAULTS.get(config.get("model_type"), {}).get("partial_rotary_factor")
    where = HF_TEXT_CONFIG.get(config.get("model_type"), "")
    if isinstance(config.get(where), dict):
        config, where = config[where], where + "."
    rope = config.get("rope_parameters")
    keyed = [("rope_parameters.partial_rotary_factor",
              rope.get("partial_rotary_factor") if isinstance(rope, dict) else None),
             ("partial_rotary_factor", config.get("partial_rotary_factor"))]
    if isinstance(config.get("rotary_dim"), int) and isinstance(config.get("head_dim"), int):
        keyed.append(("rotary_dim / head_dim", config["rotary_dim"] / config["head_dim"]))
    key, value = next(((k, v) for k, v in keyed if v is not None),
                      ("partial_rotary_factor", default if default is not None else 1.0))
    if type(value) not in (int, float) or not 0 < value <= 1:
        raise UserError(f"{where}{key}: {value!r} is not allowed (a number in (0, 1]: the share of"
                        " each head's coordinates that RoPE rotates)")
    return float(value)


def moe_dims_from_hf_config(config: dict, n_layers: int) -> MoeDims | None:
    """The experts of a mixture-of-experts ``config.json`` (:data:`HF_MOE_KEYS`), None for a
    dense ``model_type``. Sparse layers: every layer, or for ``sparse_step`` types (Qwen-MoE)
    those that transformers makes sparse, ``l not in mlp_only_layers and (l + 1) %
    decoder_sparse_step == 0`` (defaults ``[]`` and 1), and for ``first_dense`` types
    (GLM-4-MoE) layers ``first_k_dense_replace`` onwards, for ``interleave`` types (Llama 4)
    ``moe_layers`` or every ``interleave_moe_layer_step``-th layer. Keys of
    :data:`HF_CONFIG_DEFAULTS` that are absent or null take transformers' defaults. A missing
    or bad value is a UserError naming the key (the caller adds the file)."""
    keys = HF_MOE_KEYS.get(config.get("model_type"))
    if keys is None:
        return None
    if config["model_type"] in HF_TEXT_CONFIG:  # a multimodal model's text tower
        config = config.get(HF_TEXT_CONFIG[config["model_type"]]) or {}
    if keys.switch and config.get(keys.switch) is not True:
        return None
    defaults = HF_CONFIG_DEFAULTS.get(config.get("model_type"), {})
    config = {**config, **{k: v for k, v in defaults.items() if config.get(k) is None}}

    def value(key: str, default: int | None = None, low: int = 1) -> int:
        v = config.get(key)
        if v is None and default is not None:
            return default
        if key not in config:
            raise UserError(f"no {key} (needed for the mixture-of-experts layers)")
        if type(v) is not int or v < low:
            raise UserError(f"{key}: {v!r} is not allowed (an integer >= {low})")
        return v

    layers = frozenset(range(n_layers))
    if keys.sparse_step:
        step = value("decoder_sparse_step", 1)
        dense = config.get("mlp_only_layers") or []
        if not (isinstance(dense, list) and all(type(x) is int for x in dense)):
            raise UserError(f"mlp_only_layers: {dense!r} is not allowed (a list of layer"
                            " indices)")
        layers = frozenset(x for x in layers if x not in dense and (x + 1) % step == 0)
    if keys.first_dense:
        layers = frozenset(range(value(keys.first_dense, low=0), n_layers))
    if keys.interleave:
        listed = config.get("moe_layers")
        if listed is None:
            step = value("interleave_moe_layer_step", 1)
            listed = range(step - 1, n_layers, step)
        elif not (isinstance(listed, list) and all(type(x) is int for x in listed)):
            raise UserError(f"moe_layers: {listed!r} is not allowed (a list of layer indices)")
        layers = frozenset(x for x in listed if 0 <= x < n_layers)
    count_key = next((k for k in keys.n_experts if k in config), keys.n_experts[0])
    n_experts = value(count_key, low=0 if keys.sparse_step else 1)
    if n_experts == 0:  # Qwen-MoE with num_experts 0: every layer dense
        layers = frozenset()
    d_expert = value(keys.d_expert)
    d_shared = value(keys.d_shared, 0, 0) if keys.d_shared else 0
    if keys.shared_count:
        d_shared = value(keys.shared_count, low=0) * d_expert
    return MoeDims(n_experts=n_experts, d_expert=d_expert, d_shared=d_shared,
                   sparse_layers=layers)


def dims_from_gguf_metadata(meta: dict, arch: str) -> ModelDims:
    """Dimensions from GGUF metadata keys ``{arch}.block_count`` etc.

    A missing or non-integer key is a UserError naming the key (the caller adds the file); so
    are a ``head_count_kv`` that does not divide ``head_count``, an ``embedding_length`` that
    the heads do not split evenly when there is no ``key_length``, and an odd ``d_head`` for
    :data:`GGUF_ROPE_PERMUTED` (its RoPE row pairs cannot be undone).
    """
    h_key, kv_key = f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"
    h = _gguf_int(meta, h_key)
    if (latent := latent_dims_from_gguf_metadata(meta, arch)) is not None:  # MQA on file
        n_layers = _gguf_int(meta, f"{arch}.block_count") - gguf_extra_layers(meta, arch)
        return ModelDims(n_layers, *(_gguf_int(meta, f"{arch}.{key}") for key in (
            "embedding_length", "feed_forward_length")), h, h, latent.nope + latent.rope)
    d = _gguf_int(meta, f"{arch}.embedding_length")
    head_dim_key = f"{arch}.attention.key_length"
    d_head = (_gguf_int(meta, head_dim_key, default=0)
              or _even_d_head(f"{arch}.embedding_length", d, h_key, h, head_dim_key,
                              "the GGUF metadata"))
    if arch in GGUF_PER_LAYER_DIMS:
        return _gguf_per_layer_dims(meta, arch, d, h, d_head)
    n_kv = _gguf_int(meta, kv_key, default=0) or h
    _check_kv_heads(h_key, h, kv_key, n_kv)
    if arch in GGUF_ROPE_PERMUTED and d_head % 2:
        how = (f"{head_dim_key} = {d_head}" if meta.get(head_dim_key) else
               f"{arch}.embedding_length {d} / {arch}.attention.head_count {h} = {d_head}")
        raise UserError(f"d_head {d_head} is odd ({how}); a {arch} GGUF needs an even d_head"
                        " (llama.cpp stores W_Q/W_K rows in RoPE pairs)")
    return ModelDims(
        n_layers=_gguf_int(meta, f"{arch}.block_count") - gguf_extra_layers(meta, arch),
        d_model=d,
        d_ff=_gguf_int(meta, f"{arch}.{GGUF_FFN_WIDTH_KEY.get(arch, 'feed_forward_length')}"),
        n_heads=h,
        n_kv_heads=n_kv,
        d_head=d_head,
    )


def _gguf_per_layer_dims(meta: dict, arch: str, d: int, h: int, m_full: int) -> ModelDims:
    """Gemma 4's per-layer dimensions as llama.cpp's converter writes them
    (``Gemma4Model.set_gguf_parameters``, ``conversion/gemma.py``) and its loader reads them
    (``llama_model_gemma4::load_arch_hparams``; ``llama_hparams::n_embd_head_k(il)``,
    ``n_head_kv(il)``, ``n_ff(il)``): each layer's kind from ``attention.sliding_window_pattern``
    (:func:`gguf_sliding_layers`); its head size ``attention.key_length_swa`` where it slides,
    ``attention.key_length`` (``m_full``: ``global_head_dim``) where it is global, the values'
    ``value_length_swa`` / ``value_length`` the same (llama.cpp refuses others); its KV-head
    count ``attention.head_count_kv`` and FFN width ``feed_forward_length``, each an integer or
    an array of one per layer (llama.cpp's ``get_key_or_arr``: the converter writes arrays
    where ``num_global_key_value_heads`` or ``use_double_wide_mlp`` make layers differ).
    ``d_ff`` is layer 0's width (``intermediate_size``: layer 0 stores its own keys, so it is
    never double-wide), ``d_head`` and ``n_kv_heads`` the largest, as
    :func:`dims_from_hf_config` gives them. A bad value is a UserError naming the key."""
    n_layers = _gguf_int(meta, f"{arch}.block_count")
    key = f"{arch}.attention."
    sizes = {}
    for slides, suffix in ((True, "_swa"), (False, "")):
        m = _gguf_int(meta, f"{key}key_length{suffix}") if slides else m_full
        value = _gguf_int(meta, f"{key}value_length{suffix}", default=0) or m
        if value != m:
            raise UserError(f"GGUF metadata {key}value_length{suffix}: {value} is not allowed"
                            f" (the keys' head size, {key}key_length{suffix} = {m}: llama.cpp"
                            " requires them equal for Gemma 4)")
        sizes[slides] = m
    kv_heads = _gguf_per_layer(meta, f"{key}head_count_kv", n_layers, h)
    for layer, n_kv in enumerate(kv_heads):
        if h % n_kv:
            raise UserError(f"GGUF metadata {key}head_count_kv: {n_kv} (layer {layer}) is not"
                            f" allowed (a divisor of {key}head_count = {h})")
    ffn = _gguf_per_layer(meta, f"{arch}.feed_forward_length", n_layers)
    head_dims = tuple(sizes[slides] for slides in gguf_sliding_layers(meta, arch, n_layers))
    return ModelDims(n_layers, d, ffn[0], h, max(kv_heads), max(head_dims),
                     head_dims=head_dims, kv_heads=kv_heads, ffn_widths=ffn)


def gguf_sliding_layers(meta: dict, arch: str, n_layers: int) -> tuple[bool, ...]:
    """Whether each layer slides, from ``{arch}.attention.sliding_window_pattern``: one bool per
    layer (llama.cpp's Gemma 4 loader requires it; the converter writes ``layer_types``'
    ``sliding_attention`` as true); else a UserError naming the key."""
    key = f"{arch}.attention.sliding_window_pattern"
    pattern = meta.get(key)
    if not isinstance(pattern, tuple) or len(pattern) != n_layers or any(
            type(p) is not bool for p in pattern):
        got = (f"an array of {len(pattern)} items" if isinstance(pattern, tuple)
               else "absent" if key not in meta else repr(pattern))
        raise UserError(f"GGUF metadata {key}: {got} is not allowed (one bool per layer,"
                        f" {n_layers} layers: whether it slides, as llama.cpp's {arch} loader"
                        " reads it)")
    return pattern


def _gguf_per_layer(meta: dict, key: str, n_layers: int, default: int | None = None
                    ) -> tuple[int, ...]:
    """``key`` per layer: one integer >= 1 for every layer, or an array of one per layer
    (llama.cpp's ``get_key_or_arr``); ``default`` where absent (when given); else a UserError
    naming the key."""
    if not isinstance(meta.get(key), tuple):
        return (_gguf_int(meta, key, default) or default,) * n_layers
    values = meta[key]
    if len(values) != n_layers or any(type(v) is not int or v < 1 for v in values):
        got = (f"an array of {len(values)} items" if len(values) != n_layers
               else repr(next(v for v in values if type(v) is not int or v < 1)))
        raise UserError(f"GGUF metadata {key}: {got} is not allowed (an integer >= 1, or an"
                        f" array of one per layer, {n_layers} layers)")
    return values


def gguf_extra_layers(meta: dict, arch: str) -> int:
    """The multi-token-prediction layers that ``{arch}.block_count`` counts after the decoder's
    (``{arch}.nextn_predict_layers``, GLM-4-MoE; 0 when absent); a UserError naming the key
    where it is not below ``block_count``."""
    extra = _gguf_int(meta, f"{arch}.nextn_predict_layers", default=0)
    if extra >= (blocks := _gguf_int(meta, f"{arch}.block_count")):
        raise UserError(f"GGUF metadata {arch}.nextn_predict_layers: {extra} is not allowed"
                        f" (below {arch}.block_count = {blocks})")
    return extra


def gguf_rotary_fraction(meta: dict, arch: str, d_head: int) -> float:
    """``{arch}.rope.dimension_count / d_head`` for :data:`GGUF_PARTIAL_ROTARY` (1 when absent or
    another architecture); a UserError naming the key where it exceeds ``d_head``."""
    key = f"{arch}.rope.dimension_count"
    rotated = _gguf_int(meta, key, default=0) if arch in GGUF_PARTIAL_ROTARY else 0
    if rotated > d_head:
        raise UserError(f"GGUF metadata {key}: {rotated} is not allowed (at most d_head ="
                        f" {d_head})")
    return rotated / d_head if rotated else 1.0


def _gguf_int(meta: dict, key: str, default: int | None = None) -> int:
    """Integer metadata value ``>= 1`` (0 also for an optional key: llama.cpp's 'unset').

    :class:`~weight_geometry.gguf_file.GGUFFile` keeps arrays as tuples or ``None``.
    """
    if key not in meta:
        if default is None:
            raise UserError(f"no {key} in the GGUF metadata (needed for the model's"
                            " dimensions)")
        return default
    value = meta[key]
    if value is None or isinstance(value, tuple):
        raise UserError(f"GGUF metadata {key}: an array is not allowed (one integer >= 1;"
                        " per-layer values are not supported)")
    if type(value) is not int or value < (0 if default is not None else 1):
        raise UserError(f"GGUF metadata {key}: {value!r} is not allowed (an integer >= 1)")
    return value


def latent_dims_from_gguf_metadata(meta: dict, arch: str) -> LatentDims | None:
    """The latent attention of a :data:`GGUF_LATENT` file (None for another architecture):
    ``{arch}.attention.q_lora_rank`` (absent: no query LoRA), ``kv_lora_rank``,
    ``{arch}.rope.dimension_count`` (the RoPE width), ``attention.key_length_mla`` (the
    query/key head, no-RoPE + RoPE) and ``value_length_mla``, else ``key_length`` and
    ``value_length`` (files written before llama.cpp stored MLA as MQA over the latent, whose
    ``key_length`` is now ``kv_lora_rank + rope``). A missing or bad value is a UserError
    naming the key (the caller adds the file)."""
    if arch not in GGUF_LATENT:
        return None
    key = f"{arch}.attention."
    rope = _gguf_int(meta, f"{arch}.rope.dimension_count")
    k_key = key + ("key_length_mla" if key + "key_length_mla" in meta else "key_length")
    v_key = key + ("value_length_mla" if key + "value_length_mla" in meta else "value_length")
    m = _gguf_int(meta, k_key)
    if m <= rope:
        raise UserError(f"GGUF metadata {k_key} = {m} is not above {arch}.rope.dimension_count"
                        f" = {rope} (allowed: the query/key head, no-RoPE plus RoPE widths)")
    return _latent_dims(_gguf_int(meta, key + "q_lora_rank", default=0),
                        _gguf_int(meta, key + "kv_lora_rank"), m - rope, rope,
                        _gguf_int(meta, v_key), f"GGUF metadata {v_key}", k_key)


def moe_dims_from_gguf_metadata(meta: dict, arch: str, sparse_layers: frozenset[int]
                                ) -> MoeDims | None:
    """The experts of a GGUF file whose ``{arch}.expert_count`` is >= 1 (None: dense, absent
    or 0), any architecture: width ``{arch}.expert_feed_forward_length`` (else
    ``feed_forward_length``, as llama.cpp reads Mixtral's and OLMoE's), shared-expert width
    ``{arch}.expert_shared_feed_forward_length`` (else ``expert_shared_count`` times the expert
    width, else the expert width for :data:`GGUF_SHARED_AS_WIDE_AS_EXPERTS`, else 0), in
    ``sparse_layers`` (:func:`gguf_sparse_layers`). For :data:`GGUF_SHARED_IS_DENSE_FFN`
    (Gemma 4) ``expert_feed_forward_length`` is required (llama.cpp's ``n_ff_exp`` has no
    fallback) and the shared expert is the dense FFN (:func:`_gguf_one_ffn_width`). A bad value
    is a UserError naming the key (the caller adds the file)."""
    n_experts = _gguf_int(meta, f"{arch}.expert_count", default=0)
    if not n_experts:
        return None
    if arch in GGUF_SHARED_IS_DENSE_FFN:
        d_expert = _gguf_int(meta, f"{arch}.expert_feed_forward_length")
        d_shared = _gguf_one_ffn_width(meta, arch)
    else:
        d_expert = (_gguf_int(meta, f"{arch}.expert_feed_forward_length", default=0)
                    or _gguf_int(meta, f"{arch}.feed_forward_length"))
        d_shared = (_gguf_int(meta, f"{arch}.expert_shared_feed_forward_length", default=0)
                    or _gguf_int(meta, f"{arch}.expert_shared_count", default=0) * d_expert
                    or (d_expert if arch in GGUF_SHARED_AS_WIDE_AS_EXPERTS else 0))
    return MoeDims(n_experts=n_experts, d_expert=d_expert, d_shared=d_shared,
                   sparse_layers=sparse_layers)


def _gguf_one_ffn_width(meta: dict, arch: str) -> int:
    """The width of a dense FFN read as the shared expert (:data:`GGUF_SHARED_IS_DENSE_FFN`):
    ``{arch}.feed_forward_length``, one integer or an array of one per layer
    (:func:`_gguf_per_layer`) whose values are equal; an array of differing widths (Gemma 4's
    ``use_double_wide_mlp``, which its Hugging Face config refuses beside experts too) is a
    UserError naming the key. Cost: O(L)."""
    key = f"{arch}.feed_forward_length"
    widths = sorted(set(_gguf_per_layer(meta, key, _gguf_int(meta, f"{arch}.block_count"))))
    if len(widths) > 1:
        raise UserError(f"GGUF metadata {key}: widths {widths} are not allowed with experts"
                        f" ({arch}.expert_count: the dense FFN beside them, read as their"
                        " shared expert, would differ in width between layers; allowed: one"
                        " width for every layer)")
    return widths[0]


def gguf_sparse_layers(adapter: Adapter, layout: ExpertLayout, n_layers: int,
                       names: Collection[str]) -> frozenset[int]:
    """The layers of a GGUF mixture-of-experts file whose router (``layout.router``) is stored:
    llama.cpp's converter writes one exactly where the Hugging Face layer is sparse (dense
    leading layers, ``leading_dense_block_count``, and Qwen's ``mlp_only_layers`` have
    ``ffn_gate``/``ffn_up``/``ffn_down`` instead)."""
    return frozenset(layer for layer in range(n_layers)
                     if adapter.layer_prefix.format(layer=layer) + layout.router in names)


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
