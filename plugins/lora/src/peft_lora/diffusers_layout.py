"""The diffusers LoRA file's layout, without a model: its keys, and the metadata that carries rank and alpha.

A diffusers LoRA is one safetensors file, ``pytorch_lora_weights.safetensors``, holding the adapters of one or
more pipeline components (``unet``, ``transformer``, ``text_encoder``, ...) under keys
``<component>.<module path>.lora_A.weight`` and ``.lora_B.weight`` (DoRA adds ``.lora_magnitude_vector``),
module paths relative to the component: the PEFT layout with the component's name in place of
``base_model.model.``. Neither rank nor alpha is a tensor there: the rank is the factors' shape, and the alpha
travels in the file's safetensors metadata under ``lora_adapter_metadata``, a JSON object of LoRA config fields
prefixed by the component (``"unet.r"``, ``"unet.lora_alpha"``, ``"unet.alpha_pattern"``, ...). diffusers builds
its adapter config from that metadata when it is there, and otherwise takes alpha equal to the rank, that is a
scaling of 1 (files written by diffusers' training scripts without metadata).

Both directions go through here: :func:`lora_metadata` writes every module's rank and alpha, and
:func:`lora_config_fields` rebuilds the ``LoraConfig`` fields that compute exactly what diffusers computes with
a file. :mod:`peft_lora.diffusers` applies them to live models, :mod:`peft_lora.diffusers_format` to saved
adapters (``peft convert``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from peft_core.errors import AdapterLoadError
from peft_core.patterns import NAME_SUFFIX, compile_pattern

from peft_lora.saved import FACTOR_SUFFIXES, factor_ranks

if TYPE_CHECKING:
    import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header


# --- writing ----------------------------------------------------------------------------------------


def lora_metadata(
    component: str, ranks: dict[str, int], alphas: dict[str, float], lora_dropout: float, use_dora: bool
) -> dict[str, Any]:
    """The ``lora_adapter_metadata`` fields diffusers passes to its LoRA config, for each module's rank and
    alpha (alpha / rank being that module's scaling): the commonest values, and patterns for the others."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    fields = {
        "r": r,
        "lora_alpha": alpha,
        # Anchored at the start: peft and this library match a pattern against any name *ending* in it.
        "rank_pattern": {exact_pattern(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {exact_pattern(p): v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "lora_dropout": lora_dropout,
        "use_dora": use_dora,
        "use_rslora": False,  # already folded into the per-module alphas
        "lora_bias": False,
    }
    return {f"{component}.{k}": v for k, v in fields.items()}


def exact_pattern(path: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that matches the module ``path`` and nothing else."""
    return "^" + re.escape(path)


# --- reading ----------------------------------------------------------------------------------------


def component_tensors(tensors: Mapping[str, torch.Tensor], component: str, source: str) -> dict[str, torch.Tensor]:
    """The component's tensors, keys relative to it; raises for layouts this plugin does not read."""
    prefix = f"{component}."
    own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    if not own:
        heads = sorted({k.split(".", 1)[0] for k in tensors})
        raise AdapterLoadError(
            f"{source} has no LoRA for the component {component!r}; its keys start with {heads[:8]}. Pass "
            f"component= one of those (a pipeline's 'unet', 'transformer', 'text_encoder', ...)."
        )
    unknown = [k for k in own if not k.endswith(FACTOR_SUFFIXES)]
    if unknown:
        example = unknown[0]
        hint = (
            "a LoRA bias (lora_bias=True), which this library does not support"
            if example.endswith("lora_B.bias")
            else "not the PEFT layout (`<module>.lora_A.weight` / `.lora_B.weight`) that diffusers writes today; "
            "older or non-diffusers layouts (kohya `lora_unet_...`, `.lora.down.weight`) are not read: load the "
            "file into a diffusers pipeline with load_lora_weights and save it again with save_lora_weights"
        )
        raise AdapterLoadError(f"{source}: {component}.{example} is {hint}.")
    not_float = [k for k, v in own.items() if not v.is_floating_point()]
    if not_float:  # the loader would refuse it: factors are copied into floating-point adapters
        raise AdapterLoadError(
            f"{source}: {component}.{not_float[0]} is stored as {own[not_float[0]].dtype}; LoRA factors are "
            f"floating-point numbers, so the file is corrupt or was not written as a LoRA."
        )
    return own


def component_fields(metadata: Mapping[str, Any] | None, component: str) -> dict[str, Any] | None:
    """The component's part of ``lora_adapter_metadata``, its prefix removed (None: there is none)."""
    if not metadata:
        return None
    prefix = f"{component}."
    fields = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    return fields or None


def lora_config_fields(
    tensors: Mapping[str, torch.Tensor], fields: Mapping[str, Any] | None, source: str
) -> dict[str, Any]:
    """``LoraConfig`` fields that rebuild exactly a component's adapter from its tensors (keys relative to the
    component) and metadata ``fields``: its modules, each with its rank and alpha.

    The file's own ``target_modules`` is not used: its factors name the modules (as diffusers injects
    from the state dict), and a list of suffixes could reach further on a model.
    """
    ranks = factor_ranks(tensors.items())
    if not ranks:
        raise AdapterLoadError(f"{source} has no lora_A factors, so no LoRA to load.")
    alphas = {}
    for path, rank in ranks.items():
        if fields is None:
            alphas[path] = float(rank)  # diffusers' rule for files without metadata: scaling 1
            continue
        declared = pattern_value(fields.get("rank_pattern") or {}, path, fields.get("r", rank))
        if declared != rank:
            raise AdapterLoadError(
                f"{source}: the metadata gives {path} rank {declared}, but its factors have rank {rank}; the file "
                f"is inconsistent."
            )
        alphas[path] = float(pattern_value(fields.get("alpha_pattern") or {}, path, fields.get("lora_alpha", rank)))
    if fields is not None and fields.get("lora_bias"):
        raise AdapterLoadError(f"{source}: lora_bias=True adapters are not supported by this library.")
    if fields is not None and fields.get("use_rslora"):  # folded into plain alphas, which any reader takes
        alphas = {p: a * ranks[p] / math.sqrt(ranks[p]) for p, a in alphas.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "target_modules": "|".join(re.escape(p) for p in sorted(ranks)),  # a regex: matched whole, exactly these
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {exact_pattern(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {exact_pattern(p): v for p, v in alphas.items() if v != alpha},
        "lora_dropout": float((fields or {}).get("lora_dropout") or 0.0),
        "use_dora": bool((fields or {}).get("use_dora")) or any(k.endswith("lora_magnitude_vector") for k in tensors),
    }


def pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    """The value of the first key matching the end of ``path``, by the rule peft and diffusers use. The keys
    come from a file, so they are matched in bounded time (:mod:`peft_core.patterns`)."""
    for key, value in pattern.items():
        if compile_pattern(key, "rank_pattern/alpha_pattern key", used_as=NAME_SUFFIX).fullmatch(path):
            return value
    return default
