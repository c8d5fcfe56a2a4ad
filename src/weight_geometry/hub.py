"""Hub ids (``org/name``): resolved from the local Hugging Face cache, downloaded when online.

Only ``config.json`` and the safetensors weights (``model.safetensors`` or the index and its
shards) are ever fetched, into the standard cache (``HF_HOME``), so a cluster can pre-fetch on a
login node and read offline on compute nodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .safetensors_file import INDEX_NAME, SINGLE_NAME


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not an existing path (and not ``pypi:``)."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and ":" not in source and not Path(source).expanduser().exists())


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class HubState:
    """Where a hub checkpoint is (or will be) in the cache and whether its weights are there."""

    snapshot: Path
    complete: bool


def _cached(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, filename)
    return Path(hit) if isinstance(hit, str) else None


def cache_state(repo_id: str) -> HubState | None:
    """The cached snapshot of ``repo_id`` (None without a cached config.json)."""
    config = _cached(repo_id, "config.json")
    if config is None:
        return None
    snapshot = config.parent
    index = snapshot / INDEX_NAME
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        complete = all((snapshot / s).exists() for s in shards)
    else:
        complete = (snapshot / SINGLE_NAME).exists()
    return HubState(snapshot, complete)


def resolve(repo_id: str) -> HubState:
    """Cached state of ``repo_id``; when it is not cached and we are online, fetch its
    config.json (a few kB) so the run can be planned. Offline and uncached: one-line error."""
    state = cache_state(repo_id)
    if state is not None:
        return state
    if offline():
        raise UserError(f"source '{repo_id}' is a hub id that is not in the local Hugging Face"
                        " cache (HF_HOME) and HF_HUB_OFFLINE is set; download it first (`snakemake"
                        " download` on a machine with internet)")
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(repo_id, "config.json"))
    except Exception as err:  # network, auth, unknown repo: all end the same way for the user
        raise UserError(f"source '{repo_id}': cannot fetch config.json from the Hugging Face hub"
                        f" ({err.__class__.__name__}); check the id, your network, or set"
                        " HF_HUB_OFFLINE=1 and use a cached model") from None
    return HubState(config.parent, False)


def download(repo_id: str) -> list[Path]:
    """Fetch config.json and the safetensors weights of ``repo_id`` into the cache (no-op for
    files already there); returns the local files. Offline, only the cache is used."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    local = offline()

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, local_files_only=local))

    files = [fetch("config.json")]
    try:
        index = fetch(INDEX_NAME)
    except EntryNotFoundError:
        return [*files, fetch(SINGLE_NAME)]
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [*files, index, *(fetch(s) for s in shards)]
