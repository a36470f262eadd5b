"""The Hugging Face hub, asked once and briefly: offline, a command that needs it fails in seconds, not minutes.

transformers, huggingface_hub and datasets retry an unreachable hub for about a minute before they give up. So
before any of them is asked, `hub_source(repo_id)` decides where a hub id is read from:

    the hub answers (one HEAD request to HF_ENDPOINT, HUB_PROBE_TIMEOUT_S at most, DNS included)  -> the id itself
    HF_HUB_OFFLINE is set, or no answer, and the id's snapshot is in the local cache               -> that folder
    neither                                                                                          -> the error:
        "the hub cannot be reached: <id> is not in the local cache"
        fix: "download it on a connected machine (huggingface-cli download <id>) or point model.path at a local folder"

The probe's answer is kept for the process. `check_hub_ids(...)` runs the same decision for every hub id of a
command before the heavy imports (torch, transformers), so the error comes within a second or two of the start.
This module imports only huggingface_hub (and lorafuse.errors): the CLI calls it first.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from pathlib import Path

from lorafuse.errors import DataError, LorafuseError, ModelError

HUB_PROBE_TIMEOUT_S = 3.0


def is_hub_id(text: str) -> bool:
    """`owner/name` that is not a path on this machine (a model or data set id on the hub)."""
    text = str(text)
    if text.startswith(("builtin:", ".", "/", "~")) or text.count("/") != 1 or Path(text).expanduser().exists():
        return False
    return all(part and not part.startswith(".") for part in text.split("/"))


def offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _head(endpoint: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        # The hub's front page answers 2xx; 401/403/429 are the hub refusing. A 404 or 5xx for its front page comes
        # from something in between (a proxy or captive portal without a route out), which is no hub.
        return exc.code in (401, 403, 429)
    except (OSError, ValueError):  # URLError, timeouts and refused connections are OSErrors
        return False
    return True


@functools.lru_cache(maxsize=4)
def reachable(endpoint: str) -> bool:
    """One HEAD request (proxy settings honoured), given HUB_PROBE_TIMEOUT_S in all: the socket timeout does not
    cover the name lookup, so the request runs in a thread that is waited for that long at most."""
    answer: list[bool] = []
    probe = threading.Thread(target=lambda: answer.append(_head(endpoint)), daemon=True)
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT_S)
    return bool(answer and answer[0])


def hub_source(repo_id: str, repo_type: str = "model", key: str = "model.path") -> str:
    """`repo_id` when the hub can be reached, else its snapshot folder in the local cache (module docstring)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not offline() and reachable(constants.ENDPOINT):
        return repo_id
    try:
        return snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise unreachable_error(repo_id, repo_type, key) from None


def unreachable_error(repo_id: str, repo_type: str = "model", key: str = "model.path") -> LorafuseError:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if offline() else f"no answer from {constants.ENDPOINT}"
    kind = "--repo-type dataset " if repo_type == "dataset" else ""
    return (DataError if repo_type == "dataset" else ModelError)(
        f"the hub cannot be reached: {repo_id} is not in the local cache ({why})",
        f"download it on a connected machine (huggingface-cli download {kind}{repo_id}) or point {key} at a local "
        + (f"file or folder ({key}=path/to/train.jsonl)" if repo_type == "dataset" else "folder"),
    )


def check_hub_ids(sources: list[tuple[str | None, str, str]]) -> None:
    """For each (id or path, "model" or "dataset", config key): a hub id must be reachable or cached (else its
    error). A data set id is checked only where `datasets` is installed (without it, reading it says so)."""
    for name, repo_type, key in sources:
        if not (name and is_hub_id(name)):
            continue
        if repo_type == "model":
            hub_source(name, repo_type, key)
        elif importlib.util.find_spec("datasets") is not None:
            dataset_online(name, key)


def dataset_online(repo_id: str, key: str = "data.path") -> bool:
    """True: read the data set `repo_id` from the hub; False: from datasets' local cache (the hub cannot be reached,
    so `datasets_offline()` must be on while it loads); neither: the unreachable error."""
    from huggingface_hub import constants

    if not offline() and reachable(constants.ENDPOINT):
        return True
    from datasets.load import CachedDatasetModuleFactory

    try:
        CachedDatasetModuleFactory(repo_id).get_module()  # what load_dataset itself falls back to offline
    except Exception:  # FileNotFoundError, or a cache folder it cannot read: not usable either way
        raise unreachable_error(repo_id, "dataset", key) from None
    return False


@contextlib.contextmanager
def datasets_offline():
    """datasets in offline mode for a block (it reads its flag at each call): it goes to its cache at once instead of
    retrying the hub."""
    from datasets import config

    before = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = before
