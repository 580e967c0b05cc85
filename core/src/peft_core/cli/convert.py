"""``peft convert``: between a saved LoRA adapter (the Hugging Face PEFT format) and the diffusers LoRA format.

No model is needed: the diffusers layout is the PEFT layout with a component prefix instead of
``base_model.model.``, and the rank and alpha of every module are computed from the config and the factors'
shapes, exactly as :func:`peft_core.integrations.diffusers.diffusers_lora_state_dict` computes them on a
live model. The original ``adapter_config.json`` also travels in the file's header (``peft_adapter_config``,
which diffusers ignores), so PEFT -> diffusers -> PEFT gives back the same config, not only an equivalent one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_core.errors import AdapterLoadError, PeftError

if TYPE_CHECKING:
    import torch

CONFIG_HEADER_KEY = "peft_adapter_config"  # {component: adapter_config dict}; our own, beside diffusers' key


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert", help="convert a LoRA between the PEFT and the diffusers format",
        description="Convert a LoRA adapter between the Hugging Face PEFT format (adapter_config.json + "
        "adapter_model.safetensors) and the diffusers format (pytorch_lora_weights.safetensors, what "
        "pipeline.load_lora_weights reads). No base model is needed.",
    )
    parser.add_argument("--to", required=True, choices=("diffusers", "peft"), help="the format to write")
    parser.add_argument("src", metavar="SRC", help="the adapter to convert: a directory, a .safetensors file "
                        "(diffusers) or a Hub repo id")
    parser.add_argument("dst", metavar="DST", help="the directory to write (for --to diffusers also a "
                        ".safetensors file name)")
    parser.add_argument("--component", default="unet", help="the pipeline component the LoRA is for: unet, "
                        "transformer, text_encoder, ... (default: unet)")
    parser.add_argument("--force", action="store_true", help="overwrite an adapter already at DST")
    parser.set_defaults(run=run)
    return parser


# --- PEFT -> diffusers -----------------------------------------------------------------------------


def peft_to_diffusers(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], component: str, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A saved LoRA's (config, tensors) as diffusers (tensors, metadata), as ``diffusers_lora_state_dict``
    would give them for the same adapter on its model."""
    from peft_core.integrations.diffusers import _FACTOR_SUFFIXES, _SAVED_PREFIX, _pattern_value

    if config.get("peft_type") != "LORA":
        raise PeftError(f"The diffusers LoRA format holds LoRA adapters; {source} is {config.get('peft_type')}.")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise PeftError(
            f"{source} also trains base biases or modules_to_save, which the diffusers LoRA format cannot hold "
            f"(it holds LoRA factors only)."
        )
    out, ranks = {}, {}
    for key, tensor in tensors.items():
        path = key.removeprefix(_SAVED_PREFIX)
        if path == key or not path.endswith(_FACTOR_SUFFIXES):
            raise AdapterLoadError(f"{source}: {key!r} is no LoRA factor of the PEFT layout; cannot convert it.")
        out[f"{component}.{path}"] = tensor.contiguous()
        if path.endswith(("lora_A.weight", "lora_embedding_A")):
            ranks[path.rsplit(".lora_", 1)[0]] = int(tensor.shape[0])
    if not ranks:
        raise AdapterLoadError(f"{source} has no lora_A factors; there is nothing to write in the diffusers format.")
    alphas = {}
    for path, rank in ranks.items():
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
        # The same float operations as the LoRA layer's scaling, then diffusers_lora_state_dict's alpha.
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        alphas[path] = float(scaling) * rank
    from peft_core.integrations.diffusers import lora_metadata

    metadata = lora_metadata(
        component, ranks, alphas, float(config.get("lora_dropout") or 0.0), bool(config.get("use_dora", False))
    )
    return out, metadata


def to_diffusers(src: str, dst: str, component: str = "unet", force: bool = False) -> str:
    """Convert the saved adapter ``src`` and write the diffusers file; return its path."""
    from safetensors.torch import save

    from peft_core.integrations.diffusers import LORA_WEIGHT_NAME, METADATA_KEY, diffusers_lora_config
    from peft_core.serialization import atomic_write_bytes, read_adapter, resolve_file
    from peft_core.stacking import MANIFEST_NAME

    if resolve_file(src, MANIFEST_NAME, required=False) is not None:
        raise PeftError(f"{src} is a stack of adapters; convert one member (its subfolder) at a time.")
    saved = read_adapter(src)  # read and checked as the loader reads and checks it
    saved.peft_config()
    config = saved.config
    tensors, metadata = peft_to_diffusers(config, saved.tensors, component, src)
    file = Path(dst) if dst.endswith(".safetensors") else Path(dst, LORA_WEIGHT_NAME)
    diffusers_lora_config(tensors, metadata, component, str(file))  # what is written must load
    _check_free(file, force)
    file.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": "pt",
        METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True),
        CONFIG_HEADER_KEY: json.dumps({component: config}, sort_keys=True),
    }
    atomic_write_bytes(file, save(tensors, metadata=header))
    return str(file)


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
    from peft_core.integrations.diffusers import (
        _SAVED_PREFIX,
        _component_fields,
        _component_tensors,
        _lora_config_fields,
    )

    own = _component_tensors(tensors, component, source)
    out = {_SAVED_PREFIX + k: v.contiguous() for k, v in own.items()}
    fields = _lora_config_fields(own, _component_fields(metadata, component), source)
    if saved_config is not None:
        try:
            _, expected = peft_to_diffusers(saved_config, out, component, source)
        except PeftError:
            expected = None
        rebuilt = _lora_config_fields(own, _component_fields(expected, component), source)
        if expected is not None and rebuilt == fields:
            return saved_config, out
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, **fields}, out


def to_peft(src: str, dst: str, component: str = "unet", force: bool = False) -> str:
    """Convert the diffusers LoRA ``src`` (file, directory or Hub repo) and save it as a PEFT adapter in ``dst``."""
    from safetensors import safe_open

    from peft_core.config import CONFIG_NAME
    from peft_core.integrations.diffusers import LORA_WEIGHT_NAME, read_diffusers_lora
    from peft_core.serialization import WEIGHTS_NAME, config_from_file, parse_json, resolve_file, save_adapter

    tensors, metadata = read_diffusers_lora(src)
    file = src if os.path.isfile(src) else resolve_file(src, LORA_WEIGHT_NAME)
    with safe_open(file, framework="pt") as f:
        header = f.metadata() or {}
    try:
        saved_config = parse_json((header.get(CONFIG_HEADER_KEY) or "{}").encode(), file).get(component)
    except (AdapterLoadError, AttributeError):
        saved_config = None  # a damaged copy only costs the exact config; the factors decide
    config, out = diffusers_to_peft(tensors, metadata, saved_config, component, src)
    # Validated by the LoRA config class either way, as the loader validates it, so what is written loads. The
    # original config is written as it was, so nothing drifts; a rebuilt one with every field, as
    # save_pretrained writes it.
    parsed = config_from_file(dict(config), f"{file} ({component})")
    text = json.dumps(config, indent=2, sort_keys=True) if config is saved_config else parsed.to_json_string(
        inference_mode=True
    )
    _check_free(Path(dst, WEIGHTS_NAME), force)
    _check_free(Path(dst, CONFIG_NAME), force)
    save_adapter(dst, text, out)
    return dst


def _check_free(file: Path, force: bool) -> None:
    if file.exists() and not force:
        raise PeftError(f"{file} exists; pass --force to overwrite it.")
    if file.parent.exists() and not file.parent.is_dir():
        raise PeftError(f"{file.parent} is a file, not a directory.")


def run(args: argparse.Namespace) -> int:
    if args.to == "diffusers":
        written = to_diffusers(args.src, args.dst, args.component, args.force)
    else:
        written = to_peft(args.src, args.dst, args.component, args.force)
    print(f"converted {args.src} to the {args.to} format ({args.component}): {written}")
    return 0
