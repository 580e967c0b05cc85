"""The ``diffusers`` adapter format of ``peft convert``: a saved LoRA to a diffusers LoRA file and back, no
model needed.

The diffusers layout is the PEFT layout with a component prefix instead of ``base_model.model.``, and the rank
and alpha of every module are computed from the config and the factors' shapes, exactly as
:func:`peft_lora.diffusers.diffusers_lora_state_dict` computes them on a live model (rsLoRA folded into plain
alphas). The original ``adapter_config.json`` also travels in the file's header (``peft_adapter_config``, which
diffusers ignores), so PEFT -> diffusers -> PEFT gives back the same config, not only an equivalent one.

peft-core calls :func:`export` and :func:`import_` through the :data:`FORMAT` the plugin registers; ``options``
holds ``force`` and this format's own ``component``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_core.errors import AdapterLoadError, PeftError
from peft_core.plugins import AdapterFormat

from peft_lora.config import LoraConfig
from peft_lora.diffusers_layout import (
    LORA_WEIGHT_NAME,
    METADATA_KEY,
    component_fields,
    component_tensors,
    lora_config_fields,
    lora_metadata,
    pattern_value,
)
from peft_lora.saved import A_SUFFIXES, FACTOR_SUFFIXES, SAVED_PREFIX

if TYPE_CHECKING:
    import torch
    from peft_core.serialization import SavedAdapter

CONFIG_HEADER_KEY = "peft_adapter_config"  # {component: adapter_config dict}; our own, beside diffusers' key
DEFAULT_COMPONENT = "unet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--component", default=DEFAULT_COMPONENT, help="the pipeline component the LoRA is for: "
                        "unet, transformer, text_encoder, ... (default: unet)")


# --- PEFT -> diffusers -----------------------------------------------------------------------------


def peft_to_diffusers(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], component: str, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A saved LoRA's (config, tensors) as diffusers (tensors, metadata), as ``diffusers_lora_state_dict``
    would give them for the same adapter on its model."""
    if config.get("peft_type") != LoraConfig.PEFT_TYPE:
        raise PeftError(f"The diffusers LoRA format holds LoRA adapters; {source} is {config.get('peft_type')}.")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise PeftError(
            f"{source} also trains base biases or modules_to_save, which the diffusers LoRA format cannot hold "
            f"(it holds LoRA factors only)."
        )
    out, ranks = {}, {}
    for key, tensor in tensors.items():
        path = key.removeprefix(SAVED_PREFIX)
        if path == key or not path.endswith(FACTOR_SUFFIXES):
            raise AdapterLoadError(f"{source}: {key!r} is no LoRA factor of the PEFT layout; cannot convert it.")
        out[f"{component}.{path}"] = tensor.contiguous()
        if path.endswith(A_SUFFIXES):
            ranks[path.rsplit(".lora_", 1)[0]] = int(tensor.shape[0])
    if not ranks:
        raise AdapterLoadError(f"{source} has no lora_A factors; there is nothing to write in the diffusers format.")
    alphas = {}
    for path, rank in ranks.items():
        alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
        # The same float operations as the LoRA layer's scaling (rsLoRA: alpha / sqrt(r)), then
        # diffusers_lora_state_dict's alpha = scaling * r.
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        alphas[path] = float(scaling) * rank
    metadata = lora_metadata(
        component, ranks, alphas, float(config.get("lora_dropout") or 0.0), bool(config.get("use_dora", False))
    )
    return out, metadata


def export(saved: SavedAdapter, destination: str, options: dict[str, Any]) -> str:
    """Write the saved adapter ``saved`` as a diffusers file at ``destination`` (a directory, or a file name
    ending in ``.safetensors``); return the file's path."""
    from peft_core.serialization import atomic_write_bytes
    from safetensors.torch import save

    from peft_lora.diffusers import diffusers_lora_config

    component = options.get("component") or DEFAULT_COMPONENT
    source = os.path.dirname(saved.config_file) or saved.config_file
    tensors, metadata = peft_to_diffusers(saved.config, saved.tensors, component, source)
    file = Path(destination) if destination.endswith(".safetensors") else Path(destination, LORA_WEIGHT_NAME)
    diffusers_lora_config(tensors, metadata, component, str(file))  # what is written must load
    _check_free(file, bool(options.get("force")))
    file.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": "pt",
        METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True),
        CONFIG_HEADER_KEY: json.dumps({component: saved.config}, sort_keys=True),
    }
    atomic_write_bytes(file, save(tensors, metadata=header))
    return str(file)


def _check_free(file: Path, force: bool) -> None:
    if file.exists() and not force:
        raise PeftError(f"{file} exists; pass --force to overwrite it.")
    if file.parent.exists() and not file.parent.is_dir():
        raise PeftError(f"{file.parent} is a file, not a directory.")


# --- diffusers -> PEFT -----------------------------------------------------------------------------


def diffusers_to_peft(
    tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None, saved_config: dict[str, Any] | None,
    component: str, source: str,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The component's LoRA of a diffusers file as a PEFT (config dict, tensors).

    ``saved_config`` (the header's copy of the original config) is used if it describes exactly these
    factors with the same scalings; otherwise, or for files written elsewhere, the config is rebuilt from
    the factors and the metadata, as ``load_diffusers_lora`` does.
    """
    own = component_tensors(tensors, component, source)
    out = {SAVED_PREFIX + k: v.contiguous() for k, v in own.items()}
    fields = lora_config_fields(own, component_fields(metadata, component), source)
    if saved_config is not None:
        try:
            _, expected = peft_to_diffusers(saved_config, out, component, source)
        except PeftError:
            expected = None
        if expected is not None and lora_config_fields(own, component_fields(expected, component), source) == fields:
            return saved_config, out
    return {"peft_type": LoraConfig.PEFT_TYPE, "task_type": None, "base_model_name_or_path": None, **fields}, out


def import_(source: str, destination: str, options: dict[str, Any]) -> str:
    """Save the diffusers LoRA ``source`` (file, directory or Hub repo) as a PEFT adapter in ``destination``;
    return the directory. peft-core has checked that ``destination`` holds no adapter (or ``--force``)."""
    from peft_core.serialization import config_from_file, save_adapter

    from peft_lora.diffusers import header_json, read_file

    component = options.get("component") or DEFAULT_COMPONENT
    file, tensors, header = read_file(source)
    metadata = header_json(header, METADATA_KEY, file)
    try:
        saved_config = (header_json(header, CONFIG_HEADER_KEY, file) or {}).get(component)
    except AdapterLoadError:
        saved_config = None  # a damaged copy only costs the exact config; the factors decide
    if not isinstance(saved_config, dict):
        saved_config = None
    config, out = diffusers_to_peft(tensors, metadata, saved_config, component, source)
    # Validated by the LoRA config class either way, as the loader validates it, so what is written loads. The
    # original config is written as it was, so nothing drifts; a rebuilt one with every field, as
    # save_pretrained writes it.
    parsed = config_from_file(dict(config), f"{file} ({component})")
    text = json.dumps(config, indent=2, sort_keys=True) if config is saved_config else parsed.to_json_string(
        inference_mode=True
    )
    save_adapter(destination, text, out)
    return destination


FORMAT = AdapterFormat(
    name="diffusers",
    description="a LoRA as diffusers reads it (pytorch_lora_weights.safetensors, pipeline.load_lora_weights)",
    export=export,
    import_=import_,
    add_arguments=add_arguments,
)
