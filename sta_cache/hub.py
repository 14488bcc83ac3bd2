"""Finding a dictionary folder: a local path, the Hugging Face Hub cache, or the dictionaries shipped in the wheel."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from .dictionary import CONFIG_NAME, WEIGHTS_NAME, DictionaryFormatError

DICTIONARY_FILES = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
# Pretrained dictionaries ship inside the package as a Hugging Face cache (models--org--name/snapshots/...), so
# the same repo ids resolve with or without the Hub.
PACKAGED_HUB_CACHE = Path(__file__).parent / "pretrained"


def resolve_dictionary(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path:
    """Return a local folder holding the dictionary ``name_or_path``.

    A local folder wins. Otherwise the name is a Hub repo id, resolved by ``huggingface_hub.snapshot_download``
    (which honours ``HF_HUB_OFFLINE`` and the HF cache); if the Hub cannot be reached and the id is one of the
    dictionaries shipped with sta_cache, the packaged copy is used. A name that is neither an existing folder nor a
    valid Hub id (``org/name``, at most 96 characters) is refused before any download.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"a dictionary is named by a folder path or a Hub repo id, got {name_or_path!r}")
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a branch, tag or commit hash (a string), got {revision!r}")
    path = Path(name_or_path)
    try:
        if path.is_dir():
            return path
    except OSError as error:  # e.g. ENAMETOOLONG: then it is no folder, and no Hub id either (checked below)
        reason = error.strerror
    else:
        reason = "no such folder"
    repo_id = str(name_or_path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        shown = repr(repo_id) if len(repo_id) <= 80 else f"{repo_id[:60]!r}... ({len(repo_id)} characters)"
        raise DictionaryFormatError(
            f"{shown} is neither a local folder ({reason}) nor a valid Hub repo id ('name' or 'org/name': letters, "
            "digits, '-', '_' and '.', at most 96 characters): pass the path of a saved dictionary folder or a Hub "
            "id such as 'sta-cache/SmolLM2-135M-Instruct'"
        ) from error
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                allow_patterns=DICTIONARY_FILES,
            )
        )
    except Exception as hub_error:  # offline, unreachable, unknown repo or revision
        # huggingface_hub 1.x does not fall back to the cache for a pinned commit when offline: look there first
        for local in (cache_dir, PACKAGED_HUB_CACHE):
            found = _cached_snapshot(repo_id, revision, local)
            if found is not None:
                return found
        offline = isinstance(hub_error, (LocalEntryNotFoundError, OfflineModeIsEnabled))
        raise DictionaryFormatError(
            f"could not find dictionary {repo_id!r}"
            f"{' at revision ' + revision if revision else ''}: not a local folder, "
            + ("not in the Hugging Face cache and the Hub is offline or unreachable" if offline else str(hub_error))
        ) from hub_error


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path | None:
    """The snapshot of ``repo_id`` in a Hugging Face cache (the user's, or the one shipped in the wheel), if any."""
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=DICTIONARY_FILES,
            )
        )
    except Exception:
        return None


def packaged_repo_ids() -> list[str]:
    """The dictionaries that ship with this package (usable with no Hub access)."""
    if not PACKAGED_HUB_CACHE.is_dir():
        return []
    return sorted(
        entry.name.removeprefix("models--").replace("--", "/")
        for entry in PACKAGED_HUB_CACHE.iterdir()
        if entry.name.startswith("models--")
    )


def place_in_hf_cache(
    folder: str | os.PathLike, cache_dir: str | os.PathLike, repo_id: str, revision: str = "main"
) -> str:
    """Lay a dictionary folder out as a Hugging Face cache snapshot (``models--org--name/refs/<revision>`` and
    ``snapshots/<commit>/``), so that ``from_pretrained(repo_id, cache_dir=...)`` finds it offline. This is how the
    pretrained dictionaries ship in the wheel. Returns the (content-derived) commit hash."""
    folder, repo = Path(folder), Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    digest = hashlib.sha1()
    for name in DICTIONARY_FILES:
        digest.update((folder / name).read_bytes())
    commit = digest.hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in DICTIONARY_FILES:
        shutil.copyfile(folder / name, snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit
