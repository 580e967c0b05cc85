"""Adapters on disk and on the Hub: the Hugging Face PEFT format, written atomically, read safely.

A saved adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``. Adapters
come from strangers, so reading one executes nothing and touches nothing outside it: only safetensors is
loaded (an old ``adapter_model.bin`` only when the caller opts in, and then with ``weights_only=True``),
and no file name, ``subfolder`` or symlink may lead out of the adapter's directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peft_core.config import CONFIG_NAME, PeftConfig
from peft_core.directory_commit import (
    COMMIT_DIR,
    FileWriter,
    commit_files,
    committed_path,
    directory_lock,
    finish_interrupted_save,
)
from peft_core.errors import AdapterLoadError, ConfigError

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


# --- writing ---------------------------------------------------------------------------------------

# Checksums a saved weights file carries in its safetensors header (Hugging Face PEFT ignores them): the
# SHA-256 of the adapter_config.json it was saved with, and of its own tensors. A config and weights from
# different saves, or files changed after saving, are told apart from an adapter that was saved so.
CONFIG_DIGEST_KEY = "peft_config_sha256"
TENSORS_DIGEST_KEY = "peft_tensors_sha256"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in key order: the same before saving and
    after loading."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the bytes in place, no copy
    return digest.hexdigest()


def adapter_files(config_json: str, tensors: dict[str, torch.Tensor]) -> dict[str, FileWriter]:
    """The two files of one saved adapter, as writers for :func:`~peft_core.directory_commit.commit_files`."""
    from safetensors.torch import save_file

    config_bytes = config_json.encode()
    # safetensors refuses shared or non-contiguous storage; saved tensors are plain CPU copies.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {
        "format": "pt",
        CONFIG_DIGEST_KEY: hashlib.sha256(config_bytes).hexdigest(),
        TENSORS_DIGEST_KEY: tensors_digest(plain),
    }
    return {
        WEIGHTS_NAME: lambda path: save_file(plain, path, metadata=metadata),
        CONFIG_NAME: lambda path: Path(path).write_bytes(config_bytes),
    }


def save_adapter(directory: str | os.PathLike, config_json: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter's weights and config into ``directory`` as one unit (see
    :mod:`peft_core.directory_commit`): a reader sees the earlier adapter there or this one, never a mix."""
    commit_files(directory, adapter_files(config_json, tensors))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a mix."""
    commit_files(os.path.dirname(os.path.abspath(path)), {os.path.basename(path): lambda f: Path(f).write_bytes(data)})


# --- finding files ---------------------------------------------------------------------------------


def check_subfolder(subfolder: str | None) -> None:
    """Refuse a ``subfolder`` that could lead out of the adapter's folder or repo."""
    if not subfolder:
        return
    parts = str(subfolder).replace("\\", "/").split("/")
    if os.path.isabs(subfolder) or any(part in ("..", "") for part in parts) or ":" in str(subfolder):
        raise AdapterLoadError(
            f"subfolder={subfolder!r} is not a relative path inside the adapter's folder (no '..', no absolute "
            f"path); name the subfolder as it sits in the adapter's directory or repo, e.g. 'task/adapter'."
        )


def _inside(file: Path, root: Path) -> bool:
    """Whether ``file``, symlinks followed, lies in ``root``, in the commit of a save into it not yet rolled
    forward (see :mod:`peft_core.directory_commit`), or in the blob store of the Hub cache snapshot ``root``
    is, whose files are symlinks into ``../../blobs``."""
    real = file.resolve()
    roots = [root.resolve(), (root.parent / COMMIT_DIR / root.name).resolve()]
    if roots[0].parent.name == "snapshots":
        roots.append(roots[0].parent.parent / "blobs")
    return any(real.is_relative_to(r) for r in roots)


def resolve_file(
    path_or_repo: str | os.PathLike, filename: str, *, subfolder: str | None = None,
    revision: str | None = None, token: str | bool | None = None, cache_dir: str | None = None,
    local_files_only: bool = False, required: bool = True,
) -> str | None:
    """Local path of ``filename`` in a directory (as of its last committed save) or a Hugging Face Hub repo
    (downloaded or cached)."""
    check_subfolder(subfolder)
    root = Path(path_or_repo)
    local = root / (subfolder or "")
    if local.is_dir():
        candidate = committed_path(root, f"{subfolder}/{filename}" if subfolder else filename)
        if candidate is not None:
            if not _inside(candidate, root):
                raise AdapterLoadError(
                    f"{candidate} leads outside the adapter's directory {path_or_repo} (a symlink to "
                    f"{candidate.resolve()}); refusing to read it. Copy the real file into the adapter's folder."
                )
            return str(candidate)
        if required:
            raise AdapterLoadError(f"{local} has no {filename}. Is it an adapter saved with save_pretrained?")
        return None
    if root.exists() or str(path_or_repo).startswith((".", "/")):
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


@contextlib.contextmanager
def reading(path_or_repo: str | os.PathLike) -> Iterator[None]:
    """Hold off saves into a local adapter directory while its files are read, so that they come from one
    save (a save waits for the readers, and readers for a save)."""
    if Path(path_or_repo).is_dir():
        finish_interrupted_save(path_or_repo)
        with directory_lock(path_or_repo, exclusive=False):
            yield
    else:
        yield


# --- reading JSON ----------------------------------------------------------------------------------


class _LongInteger:
    """Stands for an integer literal too long to convert (Python refuses over 4,300 digits), so the error
    can name the field that holds it."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str) -> int | _LongInteger:
    return int(text) if len(text.lstrip("-")) <= 4000 else _LongInteger(len(text.lstrip("-")))


def _find_long_integer(value: Any) -> tuple[str, _LongInteger] | None:
    pending = [("", value)]  # iterative: the parser already allowed nesting close to the recursion limit
    while pending:
        path, item = pending.pop()
        if isinstance(item, _LongInteger):
            return path, item
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        pending.extend((f"{path}[{key!r}]" if path else repr(key), child) for key, child in children)
    return None


def parse_json(data: bytes, source: str) -> Any:
    """``data`` parsed as JSON. Whatever is wrong with it (encoding, syntax, nesting beyond Python's
    recursion limit, an integer of thousands of digits) is one :class:`AdapterLoadError` naming ``source``
    and, where it is known, the field."""
    try:
        value = json.loads(data.decode("utf-8"), parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{source} is not valid JSON ({exc}); re-save or re-download the adapter.") from None
    except RecursionError:
        raise AdapterLoadError(
            f"{source} is not valid JSON for this library: its values nest thousands of levels deep, which no "
            f"adapter config does. Re-save or re-download the adapter."
        ) from None
    except ValueError as exc:
        raise AdapterLoadError(f"{source} is not valid JSON ({exc}); re-save or re-download the adapter.") from None
    found = _find_long_integer(value)
    if found is not None:
        field, number = found
        raise AdapterLoadError(
            f"{source}: {field} is an integer of {number.digits} digits, which no adapter config holds; the file "
            f"is damaged or hostile. Re-save or re-download the adapter."
        )
    return value


def _config_file(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> str:
    path = Path(path_or_repo)
    return str(path) if path.is_file() else resolve_file(path_or_repo, CONFIG_NAME, **hub_kwargs)


def _config_data(raw: bytes, file: str) -> dict[str, Any]:
    data = parse_json(raw, file)
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{file} holds no JSON object; it is not an adapter config.")
    return data


def read_config_dict(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    file = _config_file(path_or_repo, **hub_kwargs)
    return _config_data(Path(file).read_bytes(), file)


def config_from_file(data: dict[str, Any], file: str) -> PeftConfig:
    """The config of the class ``data``'s ``peft_type`` names; errors name ``file``."""
    from peft_core.config import config_from_dict

    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def read_config(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> PeftConfig:
    """The config of a saved adapter, of the class its ``peft_type`` names; errors name the file."""
    file = _config_file(path_or_repo, **hub_kwargs)
    return config_from_file(read_config_dict(file), file)


# --- reading adapters ------------------------------------------------------------------------------


@dataclass
class SavedAdapter:
    """One saved adapter's config and weights, read together from one save."""

    config: dict[str, Any]  # adapter_config.json, parsed
    config_file: str
    config_sha256: str  # of the file's bytes
    tensors: dict[str, torch.Tensor]
    weights_file: str
    metadata: dict[str, str]  # the weights file's safetensors header metadata

    def peft_config(self) -> PeftConfig:
        return config_from_file(self.config, self.config_file)

    def verify(self) -> str:
        """Check that the two files are the pair this library saved, unchanged since: ``"verified"``, or
        ``"unrecorded"`` for weights without checksums (saved by Hugging Face PEFT, an older version, or a
        legacy ``.bin``). Raises :class:`AdapterLoadError` naming what does not match."""
        recorded_config = self.metadata.get(CONFIG_DIGEST_KEY)
        recorded_tensors = self.metadata.get(TENSORS_DIGEST_KEY)
        if recorded_config is None and recorded_tensors is None:
            return "unrecorded"
        if recorded_config is not None and self.config_sha256 and recorded_config != self.config_sha256:
            raise AdapterLoadError(
                f"{self.config_file} is not the config {os.path.basename(self.weights_file)} was saved with "
                f"(SHA-256 {self.config_sha256[:12]}..., the weights record {recorded_config[:12]}...): the two "
                f"files come from different saves (an interrupted copy, two programs writing one folder) or the "
                f"config was edited after saving. Save or download the adapter again; if you edited the config on "
                f"purpose, load it with verify_integrity=False."
            )
        if recorded_tensors is not None and recorded_tensors != tensors_digest(self.tensors):
            raise AdapterLoadError(
                f"{self.weights_file} does not hold the tensors it was saved with (their SHA-256 differs from the "
                f"one in its header): the file was changed or damaged after saving. Save or download the adapter "
                f"again; to load it as it is, pass verify_integrity=False."
            )
        return "verified"


def read_adapter(
    path_or_repo: str | os.PathLike, *, allow_legacy_bin: bool = False, verify_integrity: bool = True,
    with_config: bool = True, **hub_kwargs: Any,
) -> SavedAdapter:
    """Read a saved adapter's two files, as of one save, and check that they belong together.

    Weights saved by this library carry the SHA-256 of their config and of their own tensors: a config
    beside weights of another save, or either file changed since, is an :class:`AdapterLoadError` unless
    ``verify_integrity=False``. Adapters without checksums (Hugging Face PEFT's) load as they are.
    ``with_config=False`` reads the weights alone (the caller brings its own config).
    """
    with reading(path_or_repo):
        config_file = _config_file(path_or_repo, **hub_kwargs) if with_config else ""
        raw = Path(config_file).read_bytes() if with_config else b""
        try:
            weights_file, tensors, metadata = _read_weights(path_or_repo, allow_legacy_bin, hub_kwargs)
        except AdapterLoadError:
            if with_config:  # a config that cannot load at all (its plugin is not installed) says more
                config_from_file(_config_data(raw, config_file), config_file)
            raise
    config = _config_data(raw, config_file) if with_config else {}
    config_sha256 = hashlib.sha256(raw).hexdigest() if with_config else ""
    saved = SavedAdapter(config, config_file, config_sha256, tensors, weights_file, metadata)
    if verify_integrity:
        saved.verify()
    return saved


def read_weights(
    path_or_repo: str | os.PathLike, *, allow_legacy_bin: bool = False, **hub_kwargs: Any
) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter's weights file (unverified: :func:`read_adapter` checks them)."""
    return _read_weights(path_or_repo, allow_legacy_bin, hub_kwargs)[1]


def _read_weights(
    path_or_repo: str | os.PathLike, allow_legacy_bin: bool, hub_kwargs: dict[str, Any]
) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(file, tensors, safetensors header metadata) of the adapter's weights.

    An adapter with only a legacy ``adapter_model.bin`` (a pickle) is refused unless ``allow_legacy_bin``,
    and even then read with ``weights_only=True``, which builds tensors and plain containers only.
    """
    file = resolve_file(path_or_repo, WEIGHTS_NAME, required=False, **hub_kwargs)
    if file is None:
        return _read_legacy_bin(path_or_repo, allow_legacy_bin, hub_kwargs)

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return file, {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{file} is truncated or corrupt ({exc}). Download or save the adapter again."
        ) from exc


def _read_legacy_bin(
    path_or_repo: str | os.PathLike, allow_legacy_bin: bool, hub_kwargs: dict[str, Any]
) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
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
    return legacy, loaded, {}


def check_fit(targets: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str) -> None:
    """Refuse ``loaded`` unless it fits the live tensors ``targets`` exactly: each key has a place in the
    model and each place a key, with the same shape; a float may go into a float of another dtype, any
    other dtype must match."""
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


def copy_values(targets: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> None:
    """Copy ``loaded`` into the live tensors ``targets`` (after :func:`check_fit`). Floating-point values are
    cast to the live tensor's dtype: a bfloat16 file into a float32 adapter exactly, a float32 file into a
    bfloat16 adapter rounded to nearest."""
    with torch.no_grad():
        for key, tensor in loaded.items():
            target = targets[key]
            if target.is_meta:  # a model built on 'meta' gets real adapter weights by swapping them in
                target.data = tensor.to(target.dtype)
            else:
                target.copy_(tensor.to(target.dtype))


def copy_into(targets: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``loaded`` into the live tensors ``targets``, all or nothing: every check runs before the first
    copy, so a refused file leaves the model as it was."""
    check_fit(targets, loaded, source)
    copy_values(targets, loaded)
