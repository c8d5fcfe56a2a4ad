"""Checkpoint series: a model entry that names an ordered set of checkpoints of one training run.

Three ways to name them (config keys of one ``models`` entry):

- ``source: org/name`` (a hub id) with ``revisions: [step0, step1000, ...]`` (each revision's
  step is the number it ends in) or ``revisions: {0: step0, 1000: step1000}`` (step: revision);
- ``source: <folder>`` holding Hugging Face Trainer checkpoints ``checkpoint-<step>/`` (steps
  read from the names; the folder's own files, e.g. a final save, are not part of the series);
- ``checkpoints: [{step: 0, path: ...}, ...]`` or ``checkpoints: {0: path, ...}``.

Each checkpoint becomes a model of its own named ``{series}/step{N}`` (``results/{series}/
step{N}/``, ``logs/{series}/step{N}/``), planned like any other model; the series' summary
lives in ``results/{series}/trajectory/``. Cost: a directory listing per folder series; no
checkpoint is opened here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import expand_home
from .errors import UserError

#: A Trainer checkpoint folder: ``checkpoint-<step>``.
TRAINER_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
#: The step a revision name ends in (``step1000``, ``ckpt-1000``, ``1000``).
REVISION_STEP = re.compile(r"(\d+)$")
#: The suffix of a checkpoint's model name: ``{series}/step{N}``.
STEP_SUFFIX = "/step"
#: A series needs a first checkpoint (the empirical null) and at least one more.
MIN_CHECKPOINTS = 2
#: The trajectory's figures (``results/{series}/trajectory/k{k}/figures/{name}.png``): one
#: per statistic of :data:`trajectory.STATISTICS` (its column) and the drift curves. Here, not
#: in :mod:`trajectory`, because the Snakefile reads them at parse time without pandas.
TRAJECTORY_FIGURES = ("adjacent_similarity", "adjacent_best_match", "bottleneck_similarity",
                      "alignment", "mean_eff_rank", "mean_normalized_eff_rank", "drift")


@dataclass(frozen=True)
class SeriesCheckpoint:
    """One checkpoint of a series: its step, its source (a path or a hub id) and, for a hub
    id, the revision."""

    step: int
    source: str
    revision: str | None = None

    def model_name(self, series: str) -> str:
        return checkpoint_name(series, self.step)


def checkpoint_name(series: str, step: int) -> str:
    """The model name of step ``step`` of ``series``: ``{series}/step{step}``."""
    return f"{series}{STEP_SUFFIX}{step}"


def is_series(entry: dict, is_hub_id) -> bool:
    """Whether a (validated) model entry names a series: ``revisions`` or ``checkpoints``
    given, or a ``source`` folder that holds ``checkpoint-<step>`` folders."""
    if entry.get("revisions") is not None or entry.get("checkpoints") is not None:
        return True
    source = entry.get("source")
    if not isinstance(source, str) or is_hub_id(source) or source.startswith("pypi:"):
        return False
    try:
        folder = expand_home(source, "source")
    except UserError:  # the single-model path says why, naming the config key
        return False
    return folder.is_dir() and bool(trainer_checkpoints(folder))


def trainer_checkpoints(folder: Path) -> list[SeriesCheckpoint]:
    """The ``checkpoint-<step>`` folders in ``folder``, by step. Cost: one listing."""
    found = []
    for child in folder.iterdir():
        m = TRAINER_CHECKPOINT.fullmatch(child.name)
        if m and child.is_dir():
            found.append(SeriesCheckpoint(int(m.group(1)), str(child)))
    return sorted(found, key=lambda c: c.step)


def series_checkpoints(name: str, entry: dict, is_hub_id) -> list[SeriesCheckpoint]:
    """The checkpoints of series ``name`` (entry keys ``source``, ``revisions``,
    ``checkpoints``), ordered by step; a one-line UserError for a malformed entry, a repeated
    step or fewer than :data:`MIN_CHECKPOINTS` checkpoints."""
    where = f"models.{name}"
    source, revisions, listed = (entry.get(k) for k in ("source", "revisions", "checkpoints"))
    if listed is not None and (source is not None or revisions is not None):
        raise UserError(f"{where}: checkpoints is not allowed with source or revisions (allowed:"
                        " either checkpoints, or a source with optional revisions)")
    if revisions is not None:
        if not isinstance(source, str) or not is_hub_id(source):
            raise UserError(f"{where}.revisions: allowed only with a hub id source (org/name),"
                            f" not {source!r}")
        found = [SeriesCheckpoint(step, source, rev) for step, rev in
                 _steps(f"{where}.revisions", revisions, _revision_step, "a revision name")]
    elif listed is not None:
        found = [SeriesCheckpoint(step, path) for step, path in
                 _steps(f"{where}.checkpoints", listed, None, "a path")]
    else:
        found = trainer_checkpoints(expand_home(str(source), "source"))
    steps = [c.step for c in found]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
        raise UserError(f"{where}: step {repeated[0]} appears twice (allowed: each step once)")
    if len(found) < MIN_CHECKPOINTS:
        raise UserError(f"{where}: a series needs at least {MIN_CHECKPOINTS} checkpoints (the"
                        f" first is the empirical null), found {len(found)}")
    return sorted(found, key=lambda c: c.step)


def _revision_step(where: str, revision: str) -> int:
    m = REVISION_STEP.search(revision)
    if m is None:
        raise UserError(f"{where}: revision {revision!r} names no step (allowed: a name ending"
                        " in its step, e.g. step1000, or a mapping step: revision)")
    return int(m.group(1))


def _steps(where: str, value, step_of, what: str) -> list[tuple[int, str]]:
    """(step, text) pairs of a list (of texts when ``step_of`` reads the step from each, else
    of ``{step, path}`` mappings) or of a ``step: text`` mapping."""
    allowed = (f"a list of {what}s ending in their step, or a mapping step: {what}"
               if step_of else f"a list of {{step: N, path: ...}}, or a mapping step: {what}")
    pairs = []
    if isinstance(value, dict):
        pairs = [(step, text) for step, text in value.items()]
    elif isinstance(value, list) and value:
        for item in value:
            if step_of is not None and isinstance(item, str | int) and not isinstance(item, bool):
                pairs.append((step_of(where, str(item)), str(item)))
            elif step_of is None and isinstance(item, dict) and set(item) == {"step", "path"}:
                pairs.append((item["step"], item["path"]))
            else:
                raise UserError(f"{where}: {item!r:.60} is not allowed ({allowed})")
    else:
        raise UserError(f"{where}: {value!r:.60} is not allowed ({allowed})")
    out = []
    for step, text in pairs:
        if isinstance(step, bool) or not re.fullmatch(r"\d+", str(step).strip()):
            raise UserError(f"{where}: step {step!r} is not allowed (an integer >= 0)")
        if not isinstance(text, str | int) or isinstance(text, bool) or not str(text).strip():
            raise UserError(f"{where}: {text!r:.60} for step {step} is not allowed ({what})")
        out.append((int(str(step).strip()), str(text)))
    return out
