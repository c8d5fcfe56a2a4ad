"""The kind of every layer's attention, from a checkpoint's config: what its kernel means.

Each layer gets one label of :data:`KINDS`:

- ``full``: softmax attention over every earlier token with RoPE: the kernel ``W_Q_i^T W_K_j``
  is the score's bilinear form at relative offset 0 (RoPE rotates the key side by the offset);
- ``sliding``: the same, over a sliding window of the last ``window`` tokens only;
- ``chunked``: the same, within chunks of ``window`` tokens (Llama 4's RoPE layers);
- ``nope``: softmax attention without positional encoding in the score (SmolLM3's and Llama
  4's NoPE layers): the kernel is the score's bilinear form exactly, at every offset;
- ``linear``: linear attention (gated DeltaNet, Qwen3.5's ``linear_attn``): no softmax kernel.

A NoPE layer is labelled ``nope`` whatever its span (a SmolLM3 config with
``use_sliding_window`` gives its NoPE layers a window too; model.json's ``attention_window``
says how long). Architectures with learned absolute positions (GPT-2) label every layer
``full``; their kernel has no rotation at all (the report says so, :func:`position_caveat`).

Sources, in order: Hugging Face ``config.json``'s ``layer_types`` (``full_attention``,
``sliding_attention``, ``chunked_attention``, ``linear_attention``), else transformers'
default for the ``model_type`` when its config has none (:data:`_HF_SLIDING`, the config
classes' ``__post_init__``), else ``full``; then ``no_rope_layers`` (``0`` = NoPE) or, for
SmolLM3 and Llama 4 without it, every ``no_rope_layer_interval``-th layer (default 4). GGUF:
``{arch}.attention.sliding_window_pattern`` (an array of one bool per layer, or a period
``n``: layer ``l`` slides unless ``(l + 1) % n == 0``), else the period llama.cpp's loader
hard-codes per architecture (``llama_model::load_hparams``), else ``full``; NoPE every 4th
layer of ``smollm3`` and ``llama4`` (llama.cpp's ``n_no_rope_layer_step``, never a key).
Cost: O(L).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .architectures import ABSOLUTE_POSITIONS, HF_HYBRID_INTERVAL, HF_TEXT_CONFIG
from .errors import UserError

FULL, SLIDING, CHUNKED, NOPE, LINEAR = "full", "sliding", "chunked", "nope", "linear"
KINDS = (FULL, SLIDING, CHUNKED, NOPE, LINEAR)
#: Kinds with a softmax attention kernel ``W_Q_i^T W_K_j`` (every kind but ``linear``).
ATTENTION_KINDS = (FULL, SLIDING, CHUNKED, NOPE)
#: transformers' ``layer_types`` values -> kind.
HF_LAYER_TYPES = {"full_attention": FULL, "sliding_attention": SLIDING,
                  "chunked_attention": CHUNKED, "linear_attention": LINEAR}


@dataclass(frozen=True)
class LayerKinds:
    """``kinds[l]``: the kind of layer ``l``; ``window``: tokens of the sliding window or of
    an attention chunk (None: no bounded span)."""

    kinds: tuple[str, ...]
    window: int | None = None

    def layers(self, *kinds: str) -> tuple[int, ...]:
        """The layers of the given kinds, in order."""
        return tuple(layer for layer, kind in enumerate(self.kinds) if kind in kinds)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers with a softmax attention kernel (all but ``linear``)."""
        return self.layers(*ATTENTION_KINDS)

    def as_dict(self) -> dict:
        """model.json's ``layer_types`` (one kind per layer) and ``attention_window``."""
        return {"layer_types": list(self.kinds), "attention_window": self.window}

    @classmethod
    def from_record(cls, model: dict) -> LayerKinds:
        """The kinds a ``model.json`` record states (every layer ``full`` in a record written
        before layer kinds existed)."""
        kinds = model.get("layer_types") or [FULL] * model["n_layers"]
        return cls(tuple(kinds), model.get("attention_window"))


def with_layer_type(table, model: dict):
    """``table`` (a DataFrame with a ``layer`` column) with a ``layer_type`` column after it:
    each row's layer kind from the ``model.json`` record. Cost O(rows)."""
    kinds = LayerKinds.from_record(model).kinds
    table = table.copy()
    table.insert(table.columns.get_loc("layer") + 1, "layer_type",
                 [kinds[layer] for layer in table["layer"]])
    return table


def _period(n: int) -> Callable[[dict, int], bool]:
    """Sliding unless ``(l + 1) % n == 0``: ``n - 1`` sliding layers, then a full one."""
    return lambda config, layer: (layer + 1) % n != 0


def _qwen(config: dict, layer: int) -> bool:
    return bool(config.get("use_sliding_window")) and layer >= config.get("max_window_layers",
                                                                          28)


#: ``model_type`` -> whether layer ``l`` slides when ``config.json`` has no ``layer_types``
#: (transformers' config classes' defaults), given a ``sliding_window``.
_HF_SLIDING: dict[str, Callable[[dict, int], bool]] = {
    "gemma2": _period(2), "gpt_oss": _period(2), "olmo3": _period(4),
    "gemma3_text": lambda c, layer: _period(c.get("sliding_window_pattern", 6))(c, layer),
    "gemma3": lambda c, layer: _period(c.get("sliding_window_pattern", 6))(c, layer),
    "mistral": lambda c, layer: True, "mixtral": lambda c, layer: True,
    "phi3": lambda c, layer: True,
    "qwen2": _qwen, "qwen3": _qwen,
    # Qwen2-MoE slides its even layers below max_window_layers, Qwen3-MoE every layer.
    "qwen2_moe": lambda c, layer: bool(c.get("use_sliding_window")) and layer % 2 == 0
    and layer < c.get("max_window_layers", 28),
    "qwen3_moe": lambda c, layer: bool(c.get("use_sliding_window")),
    # Gemma 4: five sliding layers, then a global one; the last layer always global.
    **dict.fromkeys(("gemma4_text", "gemma4"), lambda c, layer: _period(6)(c, layer)
                    and layer != c.get("num_hidden_layers", 0) - 1),
}   # SmolLM3's use_sliding_window slides its NoPE layers only: labelled nope, window kept
#: ``model_type`` -> NoPE layers every ``no_rope_layer_interval``-th layer when the config
#: has no ``no_rope_layers`` (transformers' default).
_HF_NOPE_DEFAULT = {"smollm3", "llama4_text", "llama4"}


def hf_layer_kinds(config: dict, n_layers: int) -> LayerKinds:
    """The kinds of a Hugging Face ``config.json`` dict (a multimodal one's text config); a
    ``layer_types`` or ``no_rope_layers`` of the wrong length or with an unknown value is a
    UserError naming the key, the value and what is allowed (the caller adds the file)."""
    model_type = config.get("model_type")
    where = ""
    if model_type in HF_TEXT_CONFIG and isinstance(config.get(HF_TEXT_CONFIG[model_type]), dict):
        where = HF_TEXT_CONFIG[model_type] + "."
        config = config[HF_TEXT_CONFIG[model_type]]
    if model_type in ("llama4", "llama4_text"):
        window = config.get("attention_chunk_size", 8192)
    else:
        window = config.get("sliding_window")
    types = config.get("layer_types")
    if types is None and model_type in HF_HYBRID_INTERVAL:
        types = _hybrid_layer_types(config, where, model_type, n_layers)
    if types is not None:
        kinds = [HF_LAYER_TYPES.get(t) if isinstance(t, str) else None
                 for t in _per_layer(types, f"{where}layer_types", n_layers)]
        if None in kinds:
            bad = types[kinds.index(None)]
            raise UserError(f"{where}layer_types: {bad!r} is not allowed (one of"
                            f" {', '.join(HF_LAYER_TYPES)} per layer)")
    elif model_type in ("llama4", "llama4_text"):
        kinds = [CHUNKED if window is not None else FULL] * n_layers   # NoPE ones below
    else:
        slides = _HF_SLIDING.get(model_type)
        kinds = [SLIDING if slides and window is not None and slides(config, layer) else FULL
                 for layer in range(n_layers)]
    if window is None:  # a sliding or chunked layer without a window attends to every token
        kinds = [FULL if kind in (SLIDING, CHUNKED) else kind for kind in kinds]
    for layer in _hf_nope_layers(config, model_type, where, n_layers):
        if kinds[layer] != LINEAR:
            kinds[layer] = NOPE
    if model_type == "smollm3" and not config.get("use_sliding_window"):
        window = None
    if SLIDING not in kinds and CHUNKED not in kinds and not (NOPE in kinds and window):
        window = None
    return LayerKinds(tuple(kinds), window)


def _hybrid_layer_types(config: dict, where: str, model_type: str, n_layers: int
                        ) -> list[str]:
    """A hybrid's ``layer_types`` as transformers fills them in when ``config.json`` has none
    (Qwen3-Next's published configs): every ``full_attention_interval``-th layer full
    attention, the others linear."""
    interval = config.get("full_attention_interval")
    if interval is None:
        interval = HF_HYBRID_INTERVAL[model_type]
    return ["full_attention" if full else "linear_attention" for full in _full_every(
        interval, f"{where}full_attention_interval", n_layers)]


def _full_every(interval, key: str, n_layers: int) -> list[bool]:
    """Whether each layer is full attention in a hybrid with one every ``interval`` layers
    (``(l + 1) % interval == 0``, as transformers and llama.cpp place them); a bad interval
    is a UserError naming ``key``."""
    if type(interval) is not int or interval < 1:
        raise UserError(f"{key}: {interval!r} is not allowed (an integer >= 1)")
    return [(layer + 1) % interval == 0 for layer in range(n_layers)]


def _hf_nope_layers(config: dict, model_type: str, where: str, n_layers: int) -> list[int]:
    """Layers whose ``no_rope_layers`` entry is 0 (it lists 1 for RoPE layers)."""
    flags = config.get("no_rope_layers")
    if flags is None and model_type in _HF_NOPE_DEFAULT:
        interval = config.get("no_rope_layer_interval", 4)
        if type(interval) is not int or interval < 1:
            raise UserError(f"{where}no_rope_layer_interval: {interval!r} is not allowed (an"
                            " integer >= 1)")
        return [layer for layer in range(n_layers) if (layer + 1) % interval == 0]
    if flags is None:
        return []
    flags = _per_layer(flags, f"{where}no_rope_layers", n_layers)
    if bad := [f for f in flags if f not in (0, 1) or type(f) is not int]:
        bad = bad[0]
        raise UserError(f"{where}no_rope_layers: {bad!r} is not allowed (1 for a RoPE layer, 0"
                        " for a NoPE layer)")
    return [layer for layer, f in enumerate(flags) if f == 0]


def _per_layer(values, key: str, n_layers: int) -> list:
    """``values`` as a list of (at least, as transformers reads it) one entry per layer."""
    if not isinstance(values, list) or len(values) < n_layers:
        got = f"{len(values)} entries" if isinstance(values, list) else repr(values)
        raise UserError(f"{key}: {got} is not allowed (a list of one entry per layer,"
                        f" {n_layers} layers)")
    return values[:n_layers]


#: GGUF ``general.architecture`` -> the sliding-window period llama.cpp's loader sets when the
#: file has no ``sliding_window_pattern`` (``hparams.set_swa_pattern``), given a window > 0;
#: Gemma 2's window defaults to 4096 there.
_GGUF_SWA_PERIOD = {"gemma2": 2, "gemma3": 6, "olmo2": 4, "gpt-oss": 2, "cohere2": 4}
#: GGUF hybrids (gated DeltaNet between full attention), by ``general.architecture``.
_GGUF_HYBRID = ("qwen35", "qwen35moe", "qwen3next")
#: llama.cpp's ``n_no_rope_layer_step`` (4, hard-coded): every 4th layer is NoPE.
_GGUF_NOPE_STEP = {"smollm3": 4, "llama4": 4}


def gguf_layer_kinds(meta: dict, arch: str, n_layers: int) -> LayerKinds:
    """The kinds of a GGUF file's metadata (scalars, and arrays as tuples: see
    :class:`~weight_geometry.gguf_file.GGUFFile`), as llama.cpp's loader reads them; a
    pattern of the wrong length or type is a UserError naming the key."""
    window_key = f"{arch}.attention.sliding_window"
    pattern_key = f"{arch}.attention.sliding_window_pattern"
    window = meta.get(window_key, 4096 if arch == "gemma2" else None)
    if window is not None and (type(window) is not int or window < 0):
        raise UserError(f"GGUF metadata {window_key}: {window!r} is not allowed (an integer"
                        " >= 0)")
    if arch == "llama4":   # chunked attention of 8192 tokens unless sliding_window == 0
        nope = window != 0
        window = 8192 if nope else None
        kinds = [CHUNKED if nope else FULL] * n_layers
        step = _GGUF_NOPE_STEP[arch] if nope else 0
    else:
        kinds = [SLIDING if window and slides else FULL
                 for slides in _gguf_sliding(meta, arch, pattern_key, n_layers)]
        step = _GGUF_NOPE_STEP.get(arch, 0)
        window = window if SLIDING in kinds else None
    for layer in range(n_layers):
        if step and (layer + 1) % step == 0:
            kinds[layer] = NOPE
    if arch in _GGUF_HYBRID:  # llama.cpp's recurrent layers: all but every interval-th
        key = f"{arch}.full_attention_interval"
        full = _full_every(meta.get(key, 4), f"GGUF metadata {key}", n_layers)
        kinds = [kind if f else LINEAR for kind, f in zip(kinds, full, strict=True)]
    return LayerKinds(tuple(kinds), window)


def _gguf_sliding(meta: dict, arch: str, key: str, n_layers: int) -> list[bool]:
    pattern = meta.get(key, _GGUF_SWA_PERIOD.get(arch))
    if pattern is None:
        return [False] * n_layers
    if type(pattern) is int and pattern >= 1:
        return [(layer + 1) % pattern != 0 for layer in range(n_layers)]
    if isinstance(pattern, tuple) and len(pattern) == n_layers:
        return [bool(p) for p in pattern]
    got = f"an array of {len(pattern)} items" if isinstance(pattern, tuple) else repr(pattern)
    raise UserError(f"GGUF metadata {key}: {got} is not allowed (one bool per layer,"
                    f" {n_layers} layers, or a period >= 1)")


def _layer_list(layers: tuple[int, ...]) -> str:
    """``0-2, 5, 7-8``: runs of consecutive layers."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def position_caveat(architecture: str, kinds: LayerKinds) -> str:
    """What the kernel ``W_Q_i^T W_K_j`` is, per layer kind (the report's caveat): the
    score's bilinear form before scaling, and how positions enter it."""
    if architecture in ABSOLUTE_POSITIONS:
        return ("before scaling; positions enter as learned absolute embeddings in the"
                " residual stream, not inside the score")
    rope = ("RoPE makes the true kernel depend on the relative position, and this is its"
            " zero-offset slice")
    if set(kinds.kinds) == {FULL}:
        return f"before RoPE and scaling; {rope}"
    spans = {FULL: FULL, SLIDING: f"sliding over a window of {kinds.window} tokens",
             CHUNKED: f"chunked in chunks of {kinds.window} tokens"}
    rotated = [f"{spans[kind]}: {_layer_list(layers)}" for kind in (FULL, SLIDING, CHUNKED)
               if (layers := kinds.layers(kind))]
    parts = [f"RoPE layers ({'; '.join(rotated)}): taken before RoPE; {rope}"] if rotated else []
    if layers := kinds.layers(NOPE):
        window = f", over a window of {kinds.window} tokens" if kinds.window and not (
            kinds.layers(SLIDING, CHUNKED)) else ""
        parts.append(f"NoPE layers ({_layer_list(layers)}): exact, no position enters their"
                     f" score{window}")
    if layers := kinds.layers(LINEAR):
        parts.append(f"Linear-attention layers ({_layer_list(layers)}): no softmax kernel,"
                     " left out of the attention experiments")
    return f"before scaling, by layer kind. {'. '.join(parts)}"
