"""Hub ids (``org/name``): resolved from the local Hugging Face cache, downloaded when online.

Only ``config.json`` and the safetensors weights (``model.safetensors`` or the index and its
shards) are ever fetched, into the standard cache (``HF_HOME``), so a cluster can pre-fetch on a
login node and read offline on compute nodes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .safetensors_file import INDEX_NAME, SINGLE_NAME, shard_names


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not an existing path (and not ``pypi:``)."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and ":" not in source and not Path(source).expanduser().exists())


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


_NOT_CACHED = ("the local Hugging Face cache (HF_HOME) and HF_HUB_OFFLINE is set; download it"
               " first (`snakemake download` on a machine with internet)")


@dataclass(frozen=True)
class HubState:
    """Where a hub checkpoint is (or will be) in the cache and whether its weights are there."""

    snapshot: Path
    complete: bool


def _cached(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(hit) if isinstance(hit, str) else None


def _named(repo_id: str, revision: str | None) -> str:
    """How messages name a source: ``'org/name'``, or ``'org/name' revision 'step1000'``."""
    return f"'{repo_id}'" + (f" revision '{revision}'" if revision else "")


def cache_state(repo_id: str, revision: str | None = None) -> HubState | None:
    """The cached snapshot of ``repo_id`` at ``revision`` (None: the default branch; a branch
    or tag name resolves through the cache's ``refs/<revision>``, a commit hash directly),
    or None without a cached config.json there."""
    config = _cached(repo_id, "config.json", revision)
    if config is None:
        return None
    snapshot = config.parent
    index = snapshot / INDEX_NAME
    if index.exists():
        complete = all((snapshot / s).exists() for s in shard_names(index))
    else:
        complete = (snapshot / SINGLE_NAME).exists()
    return HubState(snapshot, complete)


def resolve(repo_id: str, revision: str | None = None) -> HubState:
    """Cached state of ``repo_id`` at ``revision`` (None: the default branch); when it is not
    cached and we are online, fetch its config.json (a few kB) so the run can be planned.
    Offline, a model (or revision) not in the cache or without all its weights there
    (nothing could download them) is a one-line error; so is
    one that cannot be fetched, or that is no valid id. An id in no cache may be a mistyped
    relative path (``org/name`` is one too; :func:`is_hub_id` found nothing there): its error
    also says that no such local path exists, resolved against the working directory."""
    check_repo_id(repo_id)
    state = cache_state(repo_id, revision)
    if state is not None and (state.complete or not offline()):
        return state
    if state is not None:
        raise UserError(f"source {_named(repo_id, revision)} has its config.json but not all"
                        f" its safetensors weights in {state.snapshot} of {_NOT_CACHED}")
    try:
        return _fetch_config(repo_id, revision)
    except UserError as err:
        raise UserError(f"{err}; no local path {os.path.abspath(repo_id)} exists either"
                        ) from None


def check_repo_id(repo_id: str) -> None:
    """A one-line UserError unless ``repo_id`` is a valid hub id (huggingface_hub's rules; its
    HFValidationError would otherwise surface with stack frames from the first cache lookup).
    Such a source was no existing path either (:func:`is_hub_id`), so the message says both."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"source '{repo_id}' is neither an existing path (resolved:"
                        f" {os.path.abspath(repo_id)}) nor a valid hub id (allowed: org/name of"
                        " letters, digits, '-', '_' and '.', not starting or ending with '-' or"
                        " '.', no '--' or '..', at most 96 characters)") from None


def _fetch_config(repo_id: str, revision: str | None = None) -> HubState:
    """Fetch config.json of ``repo_id`` at ``revision``, which is not cached (a one-line
    UserError offline, or when the hub cannot be reached or refuses)."""
    if offline():
        what = "a hub id" if revision is None else "a hub revision"
        raise UserError(f"source {_named(repo_id, revision)} is {what} that is not in"
                        f" {_NOT_CACHED}")
    from huggingface_hub import hf_hub_download

    if (reason := unresolvable_endpoint()) is not None:
        raise _unreachable(repo_id, "config.json", reason, revision)
    try:
        config = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception as err:  # network, auth, unknown repo: all end the same way for the user
        raise _cannot_fetch(repo_id, "config.json", err, revision) from None
    return HubState(config.parent, False)


def unresolvable_endpoint() -> str | None:
    """Why the hub cannot be reached, when its host (``HF_ENDPOINT``) has no address here (no
    network or no DNS) and no proxy resolves it for us; None when it resolves or a proxy
    serves it (the endpoint's scheme or ``all`` in ``getproxies()``, the host not in
    ``no_proxy``). Lets a caller fail at once instead of after huggingface_hub's five retries
    (about 25 s of "Retrying in ..." lines). Cost: one DNS lookup."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, proxies = url.hostname, getproxies()
    if host is None or ((url.scheme in proxies or "all" in proxies) and not proxy_bypass(host)):
        return None
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as err:
        return f"the hub's host {host} does not resolve ({err})"
    return None


def _unreachable(repo_id: str, what: str, reason: str,
                 revision: str | None = None) -> UserError:
    return UserError(f"source {_named(repo_id, revision)}: cannot fetch {what}: {reason};"
                     " check your network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 and use a"
                     " cached model")


def _cannot_fetch(repo_id: str, name: str, err: Exception,
                  revision: str | None = None) -> UserError:
    """One line for any huggingface_hub failure: offline, that ``name`` is not cached; online,
    the error's class and first sentence (their messages span several lines)."""
    if offline():
        return UserError(f"source {_named(repo_id, revision)}: {name} is not in {_NOT_CACHED}")
    first = str(err).strip().split("\n")[0].split(". ")[0].rstrip(".")
    return UserError(f"source {_named(repo_id, revision)}: cannot fetch {name} from the"
                     f" Hugging Face hub ({err.__class__.__name__}: {first:.200}); check the id,"
                     " your network and token, or set HF_HUB_OFFLINE=1 and use a cached model")


def download(repo_id: str, revision: str | None = None) -> list[Path]:
    """Fetch config.json and the safetensors weights of ``repo_id`` at ``revision`` (None: the
    default branch) into the cache (no-op for files already there); returns the local files.
    Offline, or online when the hub's host does not resolve but every file is cached, only the
    cache is used. A file that cannot be fetched (network, auth, unknown repo, not cached
    offline) is a one-line UserError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    check_repo_id(repo_id)
    local = offline()
    if not local and (reason := unresolvable_endpoint()) is not None:
        state = cache_state(repo_id, revision)
        if state is None or not state.complete:
            raise _unreachable(repo_id, "config.json" if state is None else
                               "its safetensors weights", reason, revision)
        local = True  # everything is cached and nothing can be checked against the hub

    def fetch(name: str, optional: bool = False) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision,
                                        local_files_only=local))
        except Exception as err:
            if optional and isinstance(err, EntryNotFoundError):
                return None
            raise _cannot_fetch(repo_id, name, err, revision) from None

    files = [fetch("config.json")]
    index = fetch(INDEX_NAME, optional=True)
    if index is None:
        return [*files, fetch(SINGLE_NAME)]
    return [*files, index, *(fetch(s) for s in shard_names(index))]
