"""Adapters on disk and on the Hub: the Hugging Face PEFT format, written atomically, read safely.

A saved adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``. Only
safetensors (or, for old adapters, ``adapter_model.bin`` read with ``weights_only=True``) is loaded:
never an arbitrary pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from peft_core.config import CONFIG_NAME
from peft_core.errors import AdapterLoadError

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


# --- writing ---------------------------------------------------------------------------------------


def _staged_file(directory: str | os.PathLike, final_name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return path


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a mix."""
    staged = _staged_file(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    try:
        with open(staged, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def save_adapter(directory: str | os.PathLike, config_json: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write an adapter's weights and config into ``directory``.

    Both files are written in full next to their final names first and renamed into place only once
    both are complete, weights first: an interrupted save leaves an earlier adapter there intact.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; saved tensors are plain CPU copies.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    staged_weights = _staged_file(directory, WEIGHTS_NAME)
    staged_config = _staged_file(directory, CONFIG_NAME)
    try:
        save_file(plain, staged_weights, metadata={"format": "pt"})
        _fsync(staged_weights)
        with open(staged_config, "w") as f:
            f.write(config_json)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged_weights, os.path.join(directory, WEIGHTS_NAME))
        os.replace(staged_config, os.path.join(directory, CONFIG_NAME))
    finally:
        for staged in (staged_weights, staged_config):
            Path(staged).unlink(missing_ok=True)


# --- finding files ---------------------------------------------------------------------------------


def resolve_file(
    path_or_repo: str | os.PathLike, filename: str, *, subfolder: str | None = None,
    revision: str | None = None, token: str | bool | None = None, cache_dir: str | None = None,
    local_files_only: bool = False, required: bool = True,
) -> str | None:
    """Local path of ``filename`` in a directory or a Hugging Face Hub repo (downloaded or cached)."""
    local = Path(path_or_repo, subfolder or "")
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            return str(candidate)
        if required:
            raise AdapterLoadError(f"{local} has no {filename}. Is it an adapter saved with save_pretrained?")
        return None
    if Path(path_or_repo).exists() or str(path_or_repo).startswith((".", "/")):
        raise AdapterLoadError(f"{path_or_repo} is not a directory holding a saved adapter.")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(
            str(path_or_repo), filename, subfolder=subfolder or None, revision=revision, token=token,
            cache_dir=cache_dir, local_files_only=local_files_only,
        )
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        if not required:
            return None
        # An offline cache miss is a LocalEntryNotFoundError, itself an EntryNotFoundError in some
        # huggingface_hub versions: only a missing file in a reachable repo is "no such file".
        if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
            raise AdapterLoadError(f"The Hub repo {path_or_repo} has no {filename}.") from None
        raise AdapterLoadError(
            f"Could not get {filename} of {path_or_repo!r}: it is no local directory, and the Hugging Face "
            f"Hub gave no copy ({type(exc).__name__}: {exc}). Check the path or repo id, your network or "
            f"HF_HUB_OFFLINE, and pass token= for a private repo."
        ) from exc


def read_config_dict(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    path = Path(path_or_repo)
    file = str(path) if path.is_file() else resolve_file(path_or_repo, CONFIG_NAME, **hub_kwargs)
    try:
        with open(file) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{file} is not valid JSON ({exc}); re-save or re-download the adapter.") from exc
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{file} holds no JSON object; it is not an adapter config.")
    return data


def read_weights(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter, from safetensors (or a legacy ``.bin`` read without pickles)."""
    file = resolve_file(path_or_repo, WEIGHTS_NAME, required=False, **hub_kwargs)
    if file is None:
        legacy = resolve_file(path_or_repo, LEGACY_WEIGHTS_NAME, required=False, **hub_kwargs)
        if legacy is None:
            raise AdapterLoadError(f"{path_or_repo} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}.")
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(
                f"{legacy} could not be read as plain tensors ({exc}). Only weights are loaded, never "
                f"pickled code; convert it to safetensors with the library that wrote it."
            ) from exc

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{file} is truncated or corrupt ({exc}). Download or save the adapter again."
        ) from exc


def copy_into(targets: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy ``loaded`` into the live tensors ``targets`` with the same keys; return keys left missing.

    Raises :class:`AdapterLoadError` before copying anything if a key has no place in the model or a
    shape differs.
    """
    unexpected = [k for k in loaded if k not in targets]
    if unexpected:
        raise AdapterLoadError(
            f"The adapter in {source} has weights this model has no place for, e.g. {unexpected[0]!r} "
            f"({len(unexpected)} in all). It was trained for another model or with other target modules."
        )
    for key, tensor in loaded.items():
        if tuple(tensor.shape) != tuple(targets[key].shape):
            raise AdapterLoadError(
                f"The adapter in {source} does not fit this model: {key!r} has shape {tuple(tensor.shape)} "
                f"in the file but {tuple(targets[key].shape)} in the model. Load it into the base model "
                f"it was trained on."
            )
    with torch.no_grad():
        for key, tensor in loaded.items():
            target = targets[key]
            if target.is_meta:  # a model built on 'meta' gets real adapter weights by swapping them in
                target.data = tensor.to(target.dtype)
            else:
                target.copy_(tensor)
    return [k for k in targets if k not in loaded]
