"""The diffusers LoRA format for live models, both ways: what ``pipeline.load_lora_weights`` reads, and what
``save_lora_weights`` writes (the layout itself is :mod:`peft_lora.diffusers_layout`).

:func:`save_diffusers_lora` writes every module's own rank and scaling into the file's metadata, so
``alpha / r`` survives whatever the config's patterns or ``use_rslora`` said. :func:`load_diffusers_lora`
reads the metadata, or applies diffusers' alpha-equals-rank rule when there is none, and builds a
:class:`~peft_core.model.PeftModel` whose LoRA computes what diffusers would compute with the same file.

diffusers and safetensors are imported inside the functions; importing this module costs nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from peft_core.errors import AdapterLoadError, PeftError

from peft_lora.config import LoraConfig
from peft_lora.diffusers_layout import (
    LORA_WEIGHT_NAME,
    METADATA_KEY,
    component_fields,
    component_tensors,
    lora_config_fields,
    lora_metadata,
)
from peft_lora.saved import SAVED_PREFIX

if TYPE_CHECKING:
    import torch
    from peft_core.config import PeftConfig
    from peft_core.model import PeftModel
    from torch import nn

__all__ = [
    "LORA_WEIGHT_NAME", "METADATA_KEY", "diffusers_lora_config", "diffusers_lora_state_dict", "load_diffusers_lora",
    "read_diffusers_lora", "save_diffusers_lora",
]


# --- writing --------------------------------------------------------------------------------------


def diffusers_lora_state_dict(
    peft_model: PeftModel, component: str = "unet", adapter_name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One adapter of ``peft_model`` in the diffusers layout: (tensors, metadata), both keyed by ``component``.

    The tensors are detached CPU copies; the metadata holds the LoRA config fields diffusers (through
    Hugging Face PEFT's ``LoraConfig``) rebuilds the adapter from, with every module's rank and alpha.
    ``adapter_name`` defaults to the active adapter.
    """
    from peft_core.defaults import adapter_layers

    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise PeftError(f"No adapter named {name!r}; this model has {sorted(peft_model.peft_config)}.")
    config = peft_model.peft_config[name]
    if not isinstance(config, LoraConfig):
        raise PeftError(f"The diffusers LoRA format holds LoRA adapters; {name!r} is {config.peft_type}.")
    # diffusers refuses a file with any key that does not name a LoRA factor, so what LoRA trains besides
    # its factors (biases, whole modules) has no place in it.
    if config.bias != "none" or config.modules_to_save:
        raise PeftError(
            f"Adapter {name!r} also trains base biases or modules_to_save, which the diffusers LoRA format cannot "
            f"hold (it holds LoRA factors only). Save it with save_pretrained instead, or train it with "
            f"bias='none' and no modules_to_save."
        )

    tensors = {}
    for key, tensor in _adapter_tensors(peft_model, name, for_saving=True).items():
        path = key.removeprefix(SAVED_PREFIX)
        tensors[f"{component}.{path}"] = tensor.detach().to("cpu").contiguous().clone()

    ranks, alphas = {}, {}
    for path, layer in adapter_layers(peft_model.get_base_model(), name):
        adapter = layer.adapters[name]
        ranks[path] = int(adapter.r)
        # alpha such that alpha / r is this module's scaling, whatever produced it (patterns, rsLoRA).
        alphas[path] = float(adapter.scaling) * adapter.r
    if not ranks:
        raise PeftError(f"Adapter {name!r} adapts no layer; there is nothing to write in the diffusers format.")
    return tensors, lora_metadata(component, ranks, alphas, float(config.lora_dropout), bool(config.use_dora))


def save_diffusers_lora(
    peft_model: PeftModel | Mapping[str, PeftModel], directory: str | os.PathLike, component: str = "unet",
    adapter_name: str | None = None, weight_name: str = LORA_WEIGHT_NAME,
) -> str:
    """Write a LoRA that ``pipeline.load_lora_weights(directory)`` loads; return the file's path.

    ``peft_model`` is a :class:`~peft_core.model.PeftModel` wrapping the pipeline's ``component`` (its
    ``unet``, ``transformer``, ``text_encoder``, ...), or a mapping ``{component: peft_model}`` to put
    several components' adapters in one file, as a pipeline expects them. ``adapter_name`` defaults to each
    model's active adapter.
    """
    from peft_core.serialization import atomic_write_bytes
    from safetensors.torch import save

    models = dict(peft_model) if isinstance(peft_model, Mapping) else {component: peft_model}
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    for part, model in models.items():
        part_tensors, part_metadata = diffusers_lora_state_dict(model, part, adapter_name)
        tensors.update(part_tensors)
        metadata.update(part_metadata)
    if os.path.isfile(directory):
        raise PeftError(f"{directory} is a file; save_diffusers_lora needs a directory.")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, weight_name)
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    atomic_write_bytes(path, save(tensors, metadata=header))
    return path


# --- reading --------------------------------------------------------------------------------------


def read_diffusers_lora(
    path_or_dir: str | os.PathLike, weight_name: str = LORA_WEIGHT_NAME, **hub_kwargs: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a diffusers LoRA file and its ``lora_adapter_metadata`` (None if it has none).

    ``path_or_dir``: the file, a directory holding ``weight_name``, or a Hub repo id (``hub_kwargs``:
    ``subfolder``, ``revision``, ``token``, ...).
    """
    _, tensors, header = read_file(path_or_dir, weight_name, **hub_kwargs)
    return tensors, header_json(header, METADATA_KEY, path_or_dir)


def read_file(
    path_or_dir: str | os.PathLike, weight_name: str = LORA_WEIGHT_NAME, **hub_kwargs: Any
) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(the file's local path, its tensors, its safetensors header) of a diffusers LoRA."""
    from peft_core.serialization import resolve_file
    from safetensors import SafetensorError, safe_open

    if os.path.isfile(path_or_dir):
        file = os.fspath(path_or_dir)
    else:
        found = resolve_file(path_or_dir, weight_name, required=False, **hub_kwargs)
        if found is None:
            raise AdapterLoadError(
                f"{path_or_dir} has no {weight_name}, so it holds no diffusers LoRA. Pass the .safetensors file "
                f"itself if it has another name."
            )
        file = found
    try:
        with safe_open(file, framework="pt") as f:
            return file, {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{file} is no readable safetensors file ({exc}).") from exc


def header_json(header: Mapping[str, str], key: str, source: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object under ``key`` in a safetensors header (None if absent); parsed as safely as a config."""
    from peft_core.serialization import parse_json

    raw = header.get(key)
    if not raw:
        return None
    value = parse_json(raw.encode(), f"{source}'s {key} header")
    if not isinstance(value, dict):
        raise AdapterLoadError(f"{source}: its {key} header holds no JSON object.")
    return value


def load_diffusers_lora(
    model: nn.Module, path_or_dir: str | os.PathLike | Mapping[str, torch.Tensor], component: str = "unet",
    adapter_name: str = "default", is_trainable: bool = False, metadata: Mapping[str, Any] | None = None,
    weight_name: str = LORA_WEIGHT_NAME, **hub_kwargs: Any,
) -> PeftModel:
    """Load the ``component`` part of a diffusers LoRA onto ``model`` (that component: a UNet, a transformer).

    ``path_or_dir`` is what :func:`read_diffusers_lora` takes, or the state dict itself (then pass
    ``metadata`` if it has some). The LoRA's rank and alpha of every module come from the file's metadata;
    a file without any gets alpha = rank (scaling 1), as diffusers gives it. On a plain model this returns a
    new :class:`~peft_core.model.PeftModel` with the adapter active; on a ``PeftModel`` it adds the adapter
    (inactive until ``set_adapter``) and returns that model. ``is_trainable=False`` freezes the adapter and,
    for a new ``PeftModel``, puts it in eval mode, as ``PeftModel.from_pretrained`` does.
    """
    from peft_core.model import PeftModel, get_peft_model
    from peft_core.serialization import copy_into

    if isinstance(path_or_dir, Mapping):
        tensors, found, source = dict(path_or_dir), None, "the given state dict"
    else:
        tensors, found = read_diffusers_lora(path_or_dir, weight_name, **hub_kwargs)
        source = os.fspath(path_or_dir)
    metadata = dict(metadata) if metadata is not None else found
    config, own = diffusers_lora_config(tensors, metadata, component, source)
    # A LoRA's modules have the same shapes whether built to train or not, so the adapter is built as asked.
    config.inference_mode = not is_trainable

    adding = isinstance(model, PeftModel)
    if adding:
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name)
        if not is_trainable:
            peft_model.eval()
    try:
        copy_into(_adapter_tensors(peft_model, adapter_name), {SAVED_PREFIX + k: v for k, v in own.items()}, source)
    except Exception:
        # Hand the caller's model back as it was.
        if adding:
            peft_model.delete_adapter(adapter_name)
        else:
            peft_model.unload()
        raise
    return peft_model


def diffusers_lora_config(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None, component: str, source: str
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config that rebuilds ``component``'s LoRA of a diffusers file, checked as every loaded config is,
    and the component's tensors keyed relative to it. Raises what loading the file would raise."""
    from peft_core.config import config_from_dict

    own = component_tensors(tensors, component, source)
    fields = lora_config_fields(own, component_fields(metadata, component), source)
    return config_from_dict({"peft_type": LoraConfig.PEFT_TYPE, **fields}), own


def _adapter_tensors(peft_model: PeftModel, adapter_name: str, for_saving: bool = False) -> dict[str, torch.Tensor]:
    """Saved key -> live tensor of one adapter: the ``peft_state_dict`` mapping ``save_pretrained`` and
    ``from_pretrained`` use, so this format writes and fills exactly what they would."""
    from peft_core.plugins import registry

    tensors = registry().hook.peft_state_dict(
        model=peft_model.get_base_model(), config=peft_model.peft_config[adapter_name], adapter_name=adapter_name,
        for_saving=for_saving,
    )
    return tensors or {}
