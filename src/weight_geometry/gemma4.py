"""Gemma 4's per-layer attention: head sizes, KV-head counts and key/value reuse.

A Gemma 4 text model (``gemma4_text``, or ``gemma4``'s text tower) has sliding layers with
``head_dim`` and ``num_key_value_heads``, and global (``full``) layers with their own
``global_head_dim`` and, where ``attention_k_eq_v``, ``num_global_key_value_heads``
(transformers 5 writes these as ``per_layer_config``: ``{layer: {head_dim,
num_key_value_heads}}``, which is read first). Two more twists, as transformers' own
``Gemma4TextAttention`` applies them:

- the last ``num_kv_shared_layers`` layers store no ``k_proj``/``v_proj``: each reuses the keys
  and values of the last earlier layer of its own kind that stores them (``source``). Its
  kernel pairs its own W_Q with the source's W_K, whose keys read the *source layer's* input:
  ``W_Q_l^T W_K_src`` is the bilinear form between the two layers' normed inputs;
- with ``attention_k_eq_v`` a global layer has no ``v_proj``: its values are its keys'
  projection, normalized without a gain and not rotated, so ``W_V = W_K`` (the key's QK-norm
  gain is not in W_V).

Where ``use_double_wide_mlp``, the layers that reuse keys and values have an FFN twice as
wide. Per-layer input embeddings (``per_layer_input_gate``, ``per_layer_projection``), the
layer output scalar and the norms after each sublayer are not read (``model.json``'s
``not_used``). The RMSNorm gains multiply as stored (``x * w``, not Gemma 3's ``1 + w``).
A mixture-of-experts Gemma 4 (``enable_moe_block``) has routed experts beside the dense FFN
in every layer: the dense FFN is read as their shared expert, and each of the three reads
the stream through its own gain (architectures.py). Cost: O(L).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .errors import UserError

GEMMA4_TYPES = ("gemma4_text", "gemma4")
#: What the geometry leaves out of a Gemma 4 layer (``model.json``'s ``not_used``).
NOT_USED = ("the per-layer input embeddings (per_layer_input_gate, per_layer_projection: a"
            " second input to each layer, not attention), the per-layer output scalar and the"
            " router's per-expert output scales (a scalar per expert: no direction) are not"
            " used")
_SLIDING = "sliding_attention"


@dataclass(frozen=True)
class KvReuse:
    """Where each layer's keys and values come from: ``source[l]`` the layer whose
    ``k_proj`` (and ``v_proj``) layer ``l``'s attention reads (``l`` itself where it stores its
    own); ``keys_as_values``: the layers whose values are their keys' projection (W_V = W_K,
    read from ``k_proj`` of ``source[l]``)."""

    source: tuple[int, ...]
    keys_as_values: frozenset[int]

    def owns(self, layer: int, weight_type: str) -> bool:
        """Whether ``layer`` stores ``weight_type`` itself (W_K, W_V: not where it reuses
        another layer's, nor W_V where its values are its keys)."""
        if weight_type not in ("W_K", "W_V"):
            return True
        return self.source[layer] == layer and not (
            weight_type == "W_V" and layer in self.keys_as_values)

    def stored_as(self, layer: int, weight_type: str) -> tuple[str, int]:
        """``(weight type, layer)`` of the stored tensor ``layer``'s ``weight_type`` is."""
        if weight_type not in ("W_K", "W_V"):
            return weight_type, layer
        source = self.source[layer]
        return ("W_K" if source in self.keys_as_values else weight_type), source

    def as_dict(self) -> dict:
        """``model.json``'s record: ``kv_shared_layers`` ({layer: source}, layers that reuse
        another's keys and values) and ``keys_as_values`` (layers with W_V = W_K)."""
        return {"kv_shared_layers": {str(i): s for i, s in enumerate(self.source) if s != i},
                "keys_as_values": sorted(self.keys_as_values)}


@dataclass(frozen=True)
class Gemma4Layers:
    """Each layer's head size, KV-head count and FFN width, and its key/value reuse."""

    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    ffn_widths: tuple[int, ...]
    kv_reuse: KvReuse


def _int(config: dict, key: str, default: int | None, where: str) -> int:
    value = config.get(key)
    if value is None:
        value = default
    if type(value) is not int or value < 1:
        raise UserError(f"{where}{key}: {value!r} is not allowed (an integer >= 1)")
    return value


def layer_types(config: dict, n_layers: int) -> list[str]:
    """``layer_types``, else transformers' default (five sliding layers, then one global), the
    last layer global in either case (as ``Gemma4TextConfig`` forces it)."""
    types = list(config.get("layer_types") or [
        _SLIDING if (i + 1) % 6 else "full_attention" for i in range(n_layers)])
    if types:
        types[-1] = "full_attention"
    return types


def gemma4_layers(config: dict, n_layers: int, where: str = "") -> Gemma4Layers:
    """The per-layer sizes and key/value reuse of a Gemma 4 text ``config`` (module
    docstring); a bad value is a one-line UserError naming ``{where}{key}``."""
    h = _int(config, "num_attention_heads", None, where)
    m, n_kv = _int(config, "head_dim", 256, where), _int(config, "num_key_value_heads", h, where)
    k_eq_v = config.get("attention_k_eq_v") is True
    types = layer_types(config, n_layers)
    overrides = config.get("per_layer_config")
    if not isinstance(overrides, dict):
        full = {"head_dim": _int(config, "global_head_dim", 512, where)}
        if k_eq_v and config.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = _int(config, "num_global_key_value_heads", None, where)
        overrides = {i: full for i, t in enumerate(types) if t != _SLIDING}
    else:  # JSON keys: transformers writes them zero-padded ("03") in a model of 10+ layers
        overrides = {_layer_key(key, n_layers, where): value for key, value in overrides.items()}
    head_dims, kv_heads = [], []
    for layer in range(n_layers):
        own = overrides.get(layer) or {}
        at = f"{where}per_layer_config.{layer}."
        head_dims.append(_int(own, "head_dim", m, at))
        kv_heads.append(_int(own, "num_key_value_heads", n_kv, at))
        if h % kv_heads[-1]:
            raise UserError(f"{at}num_key_value_heads: {kv_heads[-1]} is not allowed (a"
                            f" divisor of num_attention_heads = {h})")
    reuse = _kv_reuse(config, types, k_eq_v, where)
    width = _int(config, "intermediate_size", None, where)
    wide = 2 if config.get("use_double_wide_mlp") is True else 1
    ffn = tuple(width * (wide if s != i else 1) for i, s in enumerate(reuse.source))
    if config.get("enable_moe_block") is True and len(set(ffn)) > 1:
        raise UserError(f"{where}use_double_wide_mlp: true is not supported with"
                        " enable_moe_block (the dense FFN beside the experts, read as their"
                        " shared expert, would differ in width between layers; allowed: one of"
                        " the two, or no layer reusing keys and values)")
    return Gemma4Layers(tuple(head_dims), tuple(kv_heads), ffn, reuse)


def _kv_reuse(config: dict, types: list[str], k_eq_v: bool, where: str) -> KvReuse:
    """Transformers' ``kv_sharing_modes``: layers from ``L - num_kv_shared_layers`` on reuse
    the last earlier layer of their kind; a UserError where no earlier layer of that kind
    stores keys and values."""
    shared = config.get("num_kv_shared_layers") or 0
    source = _sources(types, shared, f"{where}num_kv_shared_layers")
    if None in source:
        layer = source.index(None)
        raise UserError(f"{where}num_kv_shared_layers: {shared} leaves layer {layer}"
                        f" ({types[layer]}) no earlier layer of its kind to take keys and"
                        " values from (allowed: at most"
                        f" {len(types) - max(types.index(t) + 1 for t in set(types))})")
    values = frozenset(i for i, t in enumerate(types) if k_eq_v and t != _SLIDING)
    return KvReuse(tuple(source), values)


def _sources(kinds: Sequence, shared, key: str) -> list[int | None]:
    """Each layer's key/value source as transformers picks it (``kv_sharing_modes``): the
    last ``shared`` layers read the last earlier layer of their kind (None where there is
    none), the others their own; a ``shared`` outside 0 to ``L - 1`` is a UserError naming
    ``key``. Cost O(L^2) at most."""
    n = len(kinds)
    if type(shared) is not int or not 0 <= shared < n:
        raise UserError(f"{key}: {shared!r} is not allowed (an integer from 0 to {n - 1}: some"
                        " layer must store its own keys and values)")
    first = n - shared
    return [layer if layer < first else
            next((i for i in reversed(range(first)) if kinds[i] == kinds[layer]), None)
            for layer in range(n)]


def gguf_kv_reuse(sliding: Sequence[bool], shared: int, without_values: Collection[int],
                  key: str) -> KvReuse:
    """The key/value reuse of a Gemma 4 GGUF file, as llama.cpp reads it: its metadata says
    how many layers reuse (``shared``, ``{arch}.attention.shared_kv_layers``: the last ones)
    and each layer's kind (``sliding``), not which layer they read; llama.cpp's KV cache
    (``src/llama-model.cpp``, ``create_memory``'s ``layer_reuse_cb`` for ``LLM_ARCH_GEMMA3N``
    and ``LLM_ARCH_GEMMA4``) gives a reusing sliding layer the keys and values of layer
    ``first - 2`` and a reusing global one those of ``first - 1`` (``first = L - shared``,
    ``hparams.n_layer_kv_from_start``). That is transformers' choice (the last earlier layer
    of its kind: :func:`_kv_reuse`) wherever layer ``first - 1`` is global and ``first - 2``
    sliding, as in every published Gemma 4; a file where the two differ is a UserError naming
    ``key`` (its kernel would pair heads of different sizes in one and not the other).

    Keys as values: the file has no ``attention_k_eq_v``; llama.cpp reads ``attn_v`` as
    optional and uses the keys' projection where a layer storing ``attn_k`` has none
    (``src/models/gemma4.cpp``: ``Vcur = Kcur`` unless ``wv``), so ``without_values`` (the
    layers without a stored ``attn_v``) that store their own keys have W_V = W_K, and so do
    the layers that reuse theirs, as :func:`_kv_reuse` records them. Cost: O(L^2) at most."""
    source = _sources(sliding, shared, key)
    n = len(sliding)
    first = n - shared
    for layer in range(first, n):
        llama = first - (2 if sliding[layer] else 1)
        if source[layer] != llama:
            kind = "sliding" if sliding[layer] else "global"
            ours = f"layer {llama}" if llama >= 0 else "no layer"
            chosen = "no layer" if source[layer] is None else f"layer {source[layer]}"
            raise UserError(f"{key}: {shared} makes {kind} layer {layer} read the keys and"
                            f" values of {ours} in llama.cpp, of {chosen} in"
                            " transformers (the last earlier layer of its kind); allowed: a"
                            f" count whose layer {first - 1} is global and {first - 2} sliding")
    values = {layer for layer in without_values if layer < first}
    return KvReuse(tuple(source), frozenset(
        layer for layer in range(n) if source[layer] in values))


#: Transformers' RoPE of each Gemma 4 layer type when ``rope_parameters`` leaves it out.
_ROPE_DEFAULTS = {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25},
                  "sliding_attention": {"rope_type": "default"}}
_KIND = {"full_attention": "full", "sliding_attention": "sliding"}


def rotary_fractions(config: dict, where: str = "") -> dict[str, float]:
    """``{layer kind: the share of each head's frequency pairs its RoPE turns}``, for the kinds
    whose share is below 1: Gemma 4's global layers use proportional RoPE, which turns the
    first ``int(f m / 2)`` of a head's ``m / 2`` pairs (``partial_rotary_factor`` ``f``, 0.25 by
    default) and leaves the others at frequency 0. A bad factor is a UserError naming
    ``{where}rope_parameters.{type}.partial_rotary_factor``."""
    rope = config.get("rope_parameters") or {}
    out = {}
    for layer_type, kind in _KIND.items():
        params = rope.get(layer_type) if isinstance(rope.get(layer_type), dict) else (
            _ROPE_DEFAULTS[layer_type])
        f = params.get("partial_rotary_factor", 1.0)
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
            raise UserError(f"{where}rope_parameters.{layer_type}.partial_rotary_factor: {f!r}"
                            " is not allowed (a number in (0, 1])")
        if f < 1:
            out[kind] = float(f)
    return out


#: A ``rope_freqs`` factor at least this large leaves its pair still (its frequency divided by
#: it): llama.cpp's converter writes 1e30 for the pairs proportional RoPE does not turn.
_STILL = 1e15


def gguf_rotary_fractions(pair_factors: Sequence[float] | None, rotated_swa: int, m_swa: int,
                          key: str) -> dict[str, float]:
    """:func:`rotary_fractions` of a Gemma 4 GGUF file, from what llama.cpp's converter writes
    (``Gemma4Model.generate_extra_tensors``, ``set_gguf_parameters``, ``conversion/gemma.py``)
    and its graph reads (``src/models/gemma4.cpp``: ``rope_freqs`` as the global layers'
    ``freq_factors``): ``pair_factors``, the ``rope_freqs`` tensor, one factor per frequency
    pair of the global head, 1 for each of the ``int(f m / 2)`` pairs it turns and 1e30 for the
    others (None or empty where it is absent: every pair turns); ``rotated_swa``
    (``rope.dimension_count_swa``, ``key``) of the sliding layers' ``m_swa`` coordinates. The
    share is the turned pairs' (transformers' ``f`` wherever ``f m / 2`` is whole, as in every
    published Gemma 4); kinds that turn every pair are left out. A ``rotated_swa`` outside 1 to
    ``m_swa`` is a UserError naming ``key``. Cost: O(m)."""
    if type(rotated_swa) is not int or not 1 <= rotated_swa <= m_swa:
        raise UserError(f"{key}: {rotated_swa!r} is not allowed (an integer from 1 to the"
                        f" sliding layers' head size, {m_swa})")
    turned = [factor < _STILL for factor in ([] if pair_factors is None else pair_factors)]
    shares = {"full": float(sum(turned)) / len(turned) if turned else 1.0,
              "sliding": rotated_swa / m_swa}
    return {kind: share for kind, share in shares.items() if share < 1}


def _layer_key(key: str, n_layers: int, where: str) -> int:
    """A ``per_layer_config`` key as the layer it names (``"3"`` or ``"03"``); anything else is
    a UserError naming it."""
    if not (isinstance(key, str) and key.isdigit() and int(key) < n_layers):
        raise UserError(f"{where}per_layer_config: key {key!r} is not allowed (a layer index,"
                        f" 0 to {n_layers - 1})")
    return int(key)
