"""The diffusers LoRA format, both ways: what ``pipeline.load_lora_weights`` reads, and what
``save_lora_weights`` writes.

A diffusers LoRA is one safetensors file, ``pytorch_lora_weights.safetensors``, holding the adapters of
one or more pipeline components (``unet``, ``transformer``, ``text_encoder``, ...) under keys
``<component>.<module path>.lora_A.weight`` and ``.lora_B.weight`` (DoRA adds ``.lora_magnitude_vector``),
module paths relative to the component. Neither rank nor alpha is a tensor there: the rank is the factors'
shape, and the alpha travels in the file's safetensors metadata under ``lora_adapter_metadata``, a JSON
object of LoRA config fields prefixed by the component (``"unet.r"``, ``"unet.lora_alpha"``,
``"unet.alpha_pattern"``, ...). diffusers builds its adapter config from that metadata when it is there,
and otherwise takes alpha equal to the rank, that is a scaling of 1 (files written by diffusers'
training scripts without metadata).

:func:`save_diffusers_lora` writes every module's own rank and scaling into that metadata, so
``alpha / r`` survives whatever the config's patterns or ``use_rslora`` said. :func:`load_diffusers_lora`
reads the metadata, or applies diffusers' alpha-equals-rank rule when there is none, and builds a
:class:`~peft_core.model.PeftModel` whose LoRA computes what diffusers would compute with the same file.

diffusers and safetensors are imported inside the functions; importing this module costs nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from peft_core.errors import AdapterLoadError, PeftError
from peft_core.patterns import NAME_SUFFIX, compile_pattern

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peft_core.config import PeftConfig
    from peft_core.model import PeftModel

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
_SAVED_PREFIX = "base_model.model."  # our saved keys' prefix (the Hugging Face PEFT layout)
# Key suffixes of the diffusers (PEFT) layout that this module reads and writes, after the module path.
_FACTOR_SUFFIXES = (
    "lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B",
)


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
    if config.peft_type != "LORA":
        raise PeftError(f"The diffusers LoRA format holds LoRA adapters; {name!r} is {config.peft_type}.")
    # diffusers refuses a file with any key that does not name a LoRA factor, so what LoRA trains besides
    # its factors (biases, whole modules) has no place in it.
    if getattr(config, "bias", "none") != "none" or getattr(config, "modules_to_save", None):
        raise PeftError(
            f"Adapter {name!r} also trains base biases or modules_to_save, which the diffusers LoRA format cannot "
            f"hold (it holds LoRA factors only). Save it with save_pretrained instead, or train it with "
            f"bias='none' and no modules_to_save."
        )

    tensors = {}
    for key, tensor in peft_model._adapter_tensors(name, for_saving=True).items():
        path = key.removeprefix(_SAVED_PREFIX)
        tensors[f"{component}.{path}"] = tensor.detach().to("cpu").contiguous().clone()

    ranks, alphas = {}, {}
    for path, layer in adapter_layers(peft_model.get_base_model(), name):
        adapter = layer.adapters[name]
        ranks[path] = int(adapter.r)
        # alpha such that alpha / r is this module's scaling, whatever produced it (patterns, rsLoRA).
        alphas[path] = float(adapter.scaling) * adapter.r
    if not ranks:
        raise PeftError(f"Adapter {name!r} adapts no layer; there is nothing to write in the diffusers format.")
    metadata = lora_metadata(
        component, ranks, alphas, float(getattr(config, "lora_dropout", 0.0)), bool(getattr(config, "use_dora", False))
    )
    return tensors, metadata


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
        "rank_pattern": {_exact(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {_exact(p): v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "lora_dropout": lora_dropout,
        "use_dora": use_dora,
        "use_rslora": False,  # already folded into the per-module alphas
        "lora_bias": False,
    }
    return {f"{component}.{k}": v for k, v in fields.items()}


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
    from safetensors.torch import save

    from peft_core.serialization import atomic_write_bytes

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


def _exact(path: str) -> str:
    return "^" + re.escape(path)


# --- reading --------------------------------------------------------------------------------------


def read_diffusers_lora(
    path_or_dir: str | os.PathLike, weight_name: str = LORA_WEIGHT_NAME, **hub_kwargs: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a diffusers LoRA file and its ``lora_adapter_metadata`` (None if it has none).

    ``path_or_dir``: the file, a directory holding ``weight_name``, or a Hub repo id (``hub_kwargs``:
    ``subfolder``, ``revision``, ``token``, ...).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from peft_core.serialization import parse_json, resolve_file

    if os.path.isfile(path_or_dir):
        file = os.fspath(path_or_dir)
    else:
        file = resolve_file(path_or_dir, weight_name, **hub_kwargs)
    try:
        with safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(file)
    except (SafetensorError, OSError) as exc:
        raise AdapterLoadError(f"{file} is no readable safetensors file ({exc}).") from exc
    raw = header.get(METADATA_KEY)
    metadata = parse_json(raw.encode(), f"{file}'s {METADATA_KEY} header") if raw else None
    if metadata is not None and not isinstance(metadata, dict):
        raise AdapterLoadError(f"{file}: its {METADATA_KEY} header holds no JSON object.")
    return tensors, metadata


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
    config.inference_mode = True  # built as for inference; _set_trainable decides below

    adding = isinstance(model, PeftModel)
    if adding:
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name)
        if not is_trainable:
            peft_model.eval()
    try:
        targets = peft_model._adapter_tensors(adapter_name)
        missing = copy_into(targets, {_SAVED_PREFIX + k: v for k, v in own.items()}, source)
        if missing:
            raise AdapterLoadError(f"{source} lacks {missing[0]!r} ({len(missing)} weights in all) for its adapter.")
    except Exception:
        # Hand the caller's model back as it was.
        if adding:
            peft_model.delete_adapter(adapter_name)
        else:
            peft_model.unload()
        raise
    peft_model._set_trainable(adapter_name, is_trainable)
    return peft_model


def diffusers_lora_config(
    tensors: dict[str, torch.Tensor], metadata: Mapping[str, Any] | None, component: str, source: str
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config that rebuilds ``component``'s LoRA of a diffusers file, checked as every loaded config is,
    and the component's tensors keyed relative to it. Raises what loading the file would raise."""
    from peft_core.config import config_from_dict

    own = _component_tensors(tensors, component, source)
    fields = _component_fields(metadata, component)
    return config_from_dict({"peft_type": "LORA", **_lora_config_fields(own, fields, source)}), own


def _component_tensors(tensors: dict[str, torch.Tensor], component: str, source: str) -> dict[str, torch.Tensor]:
    """The component's tensors, keys relative to it; raises for layouts this module does not read."""
    prefix = f"{component}."
    own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    if not own:
        heads = sorted({k.split(".", 1)[0] for k in tensors})
        raise AdapterLoadError(
            f"{source} has no LoRA for the component {component!r}; its keys start with {heads[:8]}. Pass "
            f"component= one of those (a pipeline's 'unet', 'transformer', 'text_encoder', ...)."
        )
    unknown = [k for k in own if not k.endswith(_FACTOR_SUFFIXES)]
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


def _component_fields(metadata: Mapping[str, Any] | None, component: str) -> dict[str, Any] | None:
    if not metadata:
        return None
    prefix = f"{component}."
    fields = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    return fields or None


def _lora_config_fields(tensors: dict[str, torch.Tensor], fields: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """``LoraConfig`` fields that rebuild exactly the file's adapter: its modules, each with its rank and alpha.

    The file's own ``target_modules`` is not used: its factors name the modules (as diffusers injects
    from the state dict), and a list of suffixes could reach further on this model.
    """
    ranks = {}
    for key, tensor in tensors.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")):
            ranks[key.rsplit(".lora_", 1)[0]] = int(tensor.shape[0])
    if not ranks:
        raise AdapterLoadError(f"{source} has no lora_A factors, so no LoRA to load.")
    use_rslora = bool(fields and fields.get("use_rslora"))
    alphas = {}
    for path, rank in ranks.items():
        if fields is None:
            alphas[path] = float(rank)  # diffusers' rule for files without metadata: scaling 1
            continue
        declared = _pattern_value(fields.get("rank_pattern") or {}, path, fields.get("r", rank))
        if declared != rank:
            raise AdapterLoadError(
                f"{source}: the metadata gives {path} rank {declared}, but its factors have rank {rank}; the file "
                f"is inconsistent."
            )
        alphas[path] = float(_pattern_value(fields.get("alpha_pattern") or {}, path, fields.get("lora_alpha", rank)))
    if fields is not None and fields.get("lora_bias"):
        raise AdapterLoadError(f"{source}: lora_bias=True adapters are not supported by this library.")
    if use_rslora:  # folded into plain alphas, which round-trip through any reader of the format
        alphas = {p: a * ranks[p] / math.sqrt(ranks[p]) for p, a in alphas.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "target_modules": "|".join(re.escape(p) for p in sorted(ranks)),  # a regex: matched whole, exactly these
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {_exact(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {_exact(p): v for p, v in alphas.items() if v != alpha},
        "lora_dropout": float((fields or {}).get("lora_dropout") or 0.0),
        "use_dora": bool((fields or {}).get("use_dora")) or any(k.endswith("lora_magnitude_vector") for k in tensors),
    }


def _pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    """The value of the first key matching the end of ``path``, by the rule peft and diffusers use. The keys
    come from a file, so they are matched in bounded time (:mod:`peft_core.patterns`)."""
    for key, value in pattern.items():
        if compile_pattern(key, "rank_pattern/alpha_pattern key", used_as=NAME_SUFFIX).fullmatch(path):
            return value
    return default
