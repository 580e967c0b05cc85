"""Adapters on disk and on the Hub: the Hugging Face PEFT format, written atomically, read safely.

A saved adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``. Adapters
come from strangers, so reading one executes nothing and touches nothing outside it: only safetensors is
loaded (an old ``adapter_model.bin`` only when the caller opts in, and then with ``weights_only=True``),
and no file name, ``subfolder`` or symlink may lead out of the adapter's directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from peft_core.config import CONFIG_NAME, PeftConfig
from peft_core.errors import AdapterLoadError, ConfigError

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


def check_subfolder(subfolder: str | None) -> None:
    """Refuse a ``subfolder`` that could lead out of the adapter's folder or repo."""
    if not subfolder:
        return
    parts = str(subfolder).replace("\\", "/").split("/")
    if os.path.isabs(subfolder) or any(part in ("..", "") for part in parts) or ":" in str(subfolder):
        raise AdapterLoadError(
            f"subfolder={subfolder!r} is not a relative path inside the adapter's folder (no '..', no absolute "
            f"path); name the subfolder as it sits in the adapter's directory or repo, e.g. 'task/lora'."
        )


def _inside(file: Path, root: Path) -> bool:
    """Whether ``file``, symlinks followed, lies in ``root`` (or in the blob store of the Hub cache
    snapshot ``root`` is, whose files are symlinks into ``../../blobs``)."""
    real = file.resolve()
    roots = [root.resolve()]
    if roots[0].parent.name == "snapshots":
        roots.append(roots[0].parent.parent / "blobs")
    return any(real.is_relative_to(r) for r in roots)


def resolve_file(
    path_or_repo: str | os.PathLike, filename: str, *, subfolder: str | None = None,
    revision: str | None = None, token: str | bool | None = None, cache_dir: str | None = None,
    local_files_only: bool = False, required: bool = True,
) -> str | None:
    """Local path of ``filename`` in a directory or a Hugging Face Hub repo (downloaded or cached)."""
    check_subfolder(subfolder)
    local = Path(path_or_repo, subfolder or "")
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            if not _inside(candidate, Path(path_or_repo)):
                raise AdapterLoadError(
                    f"{candidate} leads outside the adapter's directory {path_or_repo} (a symlink to "
                    f"{candidate.resolve()}); refusing to read it. Copy the real file into the adapter's folder."
                )
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


def _config_file(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> str:
    path = Path(path_or_repo)
    return str(path) if path.is_file() else resolve_file(path_or_repo, CONFIG_NAME, **hub_kwargs)


def read_config_dict(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    file = _config_file(path_or_repo, **hub_kwargs)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{file} is not valid JSON ({exc}); re-save or re-download the adapter.") from exc
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{file} holds no JSON object; it is not an adapter config.")
    return data


def read_config(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> PeftConfig:
    """The config of a saved adapter, of the class its ``peft_type`` names; errors name the file."""
    from peft_core.config import config_from_dict

    data = read_config_dict(path_or_repo, **hub_kwargs)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{_config_file(path_or_repo, **hub_kwargs)}: {exc}") from None


def read_weights(
    path_or_repo: str | os.PathLike, *, allow_legacy_bin: bool = False, **hub_kwargs: Any
) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter's safetensors file.

    An adapter with only a legacy ``adapter_model.bin`` (a pickle) is refused unless ``allow_legacy_bin``,
    and even then read with ``weights_only=True``, which builds tensors and plain containers only.
    """
    file = resolve_file(path_or_repo, WEIGHTS_NAME, required=False, **hub_kwargs)
    if file is None:
        legacy = resolve_file(path_or_repo, LEGACY_WEIGHTS_NAME, required=False, **hub_kwargs)
        if legacy is None:
            raise AdapterLoadError(f"{path_or_repo} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}.")
        if not allow_legacy_bin:
            raise AdapterLoadError(
                f"{legacy} is a pickle file, a format that can run code when read. Pass allow_legacy_bin=True "
                f"(peft inspect/merge --allow-legacy-bin) to read it anyway, tensors only, with "
                f"torch.load(weights_only=True), if you trust its source; or convert it to safetensors."
            )
        try:
            loaded = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(
                f"{legacy} could not be read as plain tensors ({exc}). Only weights are loaded, never "
                f"pickled code; convert it to safetensors with the library that wrote it."
            ) from exc
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise AdapterLoadError(f"{legacy} holds no mapping of names to tensors; it is not an adapter's weights.")
        return loaded

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{file} is truncated or corrupt ({exc}). Download or save the adapter again."
        ) from exc


def copy_into(targets: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``loaded`` into the live tensors ``targets``, all or nothing.

    Every check runs before the first copy, so a refused file leaves the model as it was: each key must
    have a place in the model and each place a key, with the same shape. Floating-point values are cast
    to the live tensor's dtype (a bfloat16 file into a float32 adapter exactly, a float32 file into a
    bfloat16 adapter rounded to nearest); any other dtype must match.
    """
    unexpected = [k for k in loaded if k not in targets]
    if unexpected:
        raise AdapterLoadError(
            f"The adapter in {source} has weights this model has no place for, e.g. {unexpected[0]!r} "
            f"({len(unexpected)} in all). It was trained for another model or with other target modules."
        )
    missing = [k for k in targets if k not in loaded]
    if missing:
        raise AdapterLoadError(
            f"The adapter in {source} lacks {len(missing)} weights this model's adapter has, e.g. {missing[0]!r}. "
            f"The file is incomplete, or its config does not match its weights; save or download it again."
        )
    for key, tensor in loaded.items():
        target = targets[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise AdapterLoadError(
                f"The adapter in {source} does not fit this model: {key!r} has shape {tuple(tensor.shape)} "
                f"in the file but {tuple(target.shape)} in the model. Load it into the base model "
                f"it was trained on."
            )
        if tensor.dtype != target.dtype and not (tensor.is_floating_point() and target.is_floating_point()):
            raise AdapterLoadError(
                f"The adapter in {source} stores {key!r} as {tensor.dtype}, but this model's tensor is "
                f"{target.dtype}; the file is corrupt or was not written for this method."
            )
    with torch.no_grad():
        for key, tensor in loaded.items():
            target = targets[key]
            if target.is_meta:  # a model built on 'meta' gets real adapter weights by swapping them in
                target.data = tensor.to(target.dtype)
            else:
                target.copy_(tensor.to(target.dtype))
