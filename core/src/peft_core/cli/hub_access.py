"""Reaching the Hugging Face Hub from the ``peft`` command: an answer in seconds, with or without a network.

huggingface_hub retries a download it cannot make for about 23 seconds (five backoffs per file), and a command
reads two or three files per adapter: without a network, a mistyped repo id or a laptop on a train would wait a
minute for an error. So before the first download one request, without retries, asks whether the Hub answers at
all. If it does not, or ``HF_HUB_OFFLINE`` is set, files are read from the local cache only: an adapter
downloaded before is described as usual, and one the cache lacks is an error at once that says why.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_core.errors import AdapterLoadError


@dataclass(frozen=True)
class HubAccess:
    """How to read an adapter: ``kwargs`` for :func:`~peft_core.serialization.resolve_file` and the readers
    built on it, and ``offline``, why only the local cache is read (None: the Hub answers, or it is a path)."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    offline: str | None = None

    @contextlib.contextmanager
    def explaining(self, path_or_repo: str) -> Iterator[None]:
        """Turn "not in the cache" into an error that says why the Hub was not asked."""
        try:
            yield
        except AdapterLoadError as exc:
            if self.offline is None or not _cache_miss(exc.__cause__):
                raise
            raise AdapterLoadError(
                f"{path_or_repo} is not in the local Hugging Face cache, and {self.offline}. "
                + ("Unset HF_HUB_OFFLINE to download it" if _offline_mode() else
                   "Check your network (or HF_ENDPOINT) and try again")
                + ", or pass a local directory."
            ) from exc


def hub_access(
    path_or_repo: str, revision: str | None = None, subfolder: str | None = None, token: str | None = None
) -> HubAccess:
    """The :class:`HubAccess` for ``path_or_repo``; for a Hub repo id, asks the Hub once whether it answers."""
    kwargs = {k: v for k, v in (("revision", revision), ("subfolder", subfolder), ("token", token)) if v}
    if not is_hub_id(path_or_repo):
        return HubAccess(kwargs)
    reason = "HF_HUB_OFFLINE is set" if _offline_mode() else _unreachable(path_or_repo, revision, subfolder, token)
    if reason is None:
        return HubAccess(kwargs)
    return HubAccess({**kwargs, "local_files_only": True}, reason)


def is_hub_id(path_or_repo: str) -> bool:
    """Whether :func:`~peft_core.serialization.resolve_file` would look for ``path_or_repo`` on the Hub: it is
    no local path, and does not read like one."""
    return not Path(path_or_repo).exists() and not str(path_or_repo).startswith((".", "/"))


def _offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)  # what huggingface_hub read from HF_HUB_OFFLINE when imported


def _unreachable(repo_id: str, revision: str | None, subfolder: str | None, token: str | None) -> str | None:
    """Why the Hub cannot be asked for ``repo_id``'s files, from one request without retries; None if it
    answers (whatever it answers: a missing repo or a refused token is the download's to report)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from peft_core.config import CONFIG_NAME

    try:
        url = hf_hub_url(repo_id, CONFIG_NAME, subfolder=subfolder or None, revision=revision)
        # Releases that retry here take retry_on_errors; older ones make one request anyway.
        no_retry = {"retry_on_errors": False} if "retry_on_errors" in inspect.signature(
            get_hf_file_metadata).parameters else {}
        get_hf_file_metadata(url, token=token, **no_retry)
    except (HfHubHTTPError, ValueError):  # the Hub answered, or the id is malformed: the download says which
        return None
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except Exception as exc:  # the transport's errors (refused, unresolved, timed out): their classes vary by release
        return f"the Hugging Face Hub at {constants.ENDPOINT} does not answer ({type(exc).__name__}: {exc})"
    return None


def _cache_miss(cause: BaseException | None) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled))
