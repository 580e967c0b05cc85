"""Combining existing LoRA adapters into a new one: ``PeftModel.add_weighted_adapter`` for LoRA.

The semantics are Hugging Face PEFT's, so the same call gives the same adapter in both libraries:

* ``cat`` stacks the factors: the new rank is the sum of the ranks, each adapter's weight and scaling go
  into its block of ``A``; the result is exact (``sum w_i s_i B_i A_i``).
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine ``A`` and ``B``
  separately (each weighted by ``sqrt(|w_i s_i|)``, the sign on ``A``); all ranks must be equal.
* ``svd`` and the ``*_svd`` variants combine the full updates ``s_i B_i A_i`` and factor the result with
  a truncated SVD of rank ``svd_rank`` (default: the largest rank).

The new adapter's config is the first adapter's, with ``r`` and ``lora_alpha`` both the new rank, no rank or
alpha patterns and the union of the targets. Random pruning (DARE) draws its masks in the reference's order and
shapes, so the same ``torch.manual_seed`` gives the same adapter as Hugging Face PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from peft_core.defaults import adapter_layers
from peft_core.errors import ConfigError
from peft_core.modules_to_save import ModulesToSave
from peft_core.walk import is_linear_like, iter_modules, output_head, resolve_target_modules

from peft_lora.config import LoraConfig
from peft_lora.init import is_pissa
from peft_lora.layer import LoraAdapter, LoraEmbedding

if TYPE_CHECKING:
    from torch import nn

SVD_OPTIONS = frozenset({"svd_rank", "svd_clamp", "svd_full_matrices", "svd_driver"})
# Defaults as in Hugging Face PEFT's signature; an option left at its default is accepted by every type.
OPTION_DEFAULTS: dict[str, Any] = {
    "svd_rank": None, "svd_clamp": None, "svd_full_matrices": True, "svd_driver": None, "density": None,
    "majority_sign_method": "total",
}
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")
SIGN_METHODS = ("total", "frequency")
MERGES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class Combination:
    """How one ``combination_type`` works: what it combines (``shape``), with which merge, taking which options."""

    shape: str  # "cat": stack factors; "factors": merge A and B separately; "svd": merge updates, then factor
    merge: str  # one of MERGES (unused by "cat")
    options: frozenset[str] = frozenset()

    @property
    def needs_density(self) -> bool:
        return self.merge != "task_arithmetic"


_PRUNED = frozenset({"density"})
_SIGNED = frozenset({"density", "majority_sign_method"})
COMBINATIONS: dict[str, Combination] = {
    "linear": Combination("factors", "task_arithmetic"),
    "cat": Combination("cat", "task_arithmetic"),
    "svd": Combination("svd", "task_arithmetic", SVD_OPTIONS),
    "ties": Combination("factors", "ties", _SIGNED),
    "ties_svd": Combination("svd", "ties", SVD_OPTIONS | _SIGNED),
    "dare_linear": Combination("factors", "dare_linear", _PRUNED),
    "dare_linear_svd": Combination("svd", "dare_linear", SVD_OPTIONS | _PRUNED),
    "dare_ties": Combination("factors", "dare_ties", _SIGNED),
    "dare_ties_svd": Combination("svd", "dare_ties", SVD_OPTIONS | _SIGNED),
    "magnitude_prune": Combination("factors", "magnitude_prune", _PRUNED),
    "magnitude_prune_svd": Combination("svd", "magnitude_prune", SVD_OPTIONS | _PRUNED),
}


# --- the entry point ------------------------------------------------------------------------------


def add_weighted_adapter(
    peft_model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str,
    options: dict[str, Any],
) -> None:
    """Add ``adapter_name`` to ``peft_model``, the ``combination_type`` combination of LoRA ``adapters``.

    Raises :class:`ConfigError`, leaving the model unchanged, for a combination that is invalid or does
    not fit these adapters.
    """
    combination = _combination(combination_type)
    settings = _settings(combination_type, combination, options)
    weights = _checked_weights(weights)
    model = peft_model.base_model.model
    configs = [peft_model.peft_config[name] for name in adapters]
    _check_modules_to_save(model, adapters)
    if len(adapters) == 1 and combination_type != "linear":
        # One adapter has nothing to combine: like Hugging Face PEFT, scale it (exactly, at its own rank).
        warnings.warn(
            f"add_weighted_adapter got one adapter: combining it linearly, not with {combination_type!r}.",
            stacklevel=2,
        )
        combination = COMBINATIONS["linear"]
    if settings["svd_driver"] is not None:
        _check_driver_device(model, adapters[0], settings["svd_driver"])
    new_config = _new_config(model, configs, combination, settings["svd_rank"])

    _inject(peft_model, adapter_name, new_config)
    try:
        combined = [
            (layer.adapters[adapter_name], _combine_layer(name, layer, adapters, weights, combination, settings,
                                                          new_config.r))
            for name, layer in adapter_layers(model, adapter_name)
        ]
    except Exception:
        peft_model.delete_adapter(adapter_name)
        raise
    for target, (lora_a, lora_b) in combined:
        _write(target, lora_a, lora_b)


# --- checking the call ----------------------------------------------------------------------------


def _combination(combination_type: str) -> Combination:
    if combination_type not in COMBINATIONS:
        raise ConfigError(
            f"add_weighted_adapter: unknown combination_type {combination_type!r} for LoRA; use one of "
            f"{', '.join(COMBINATIONS)}."
        )
    return COMBINATIONS[combination_type]


def _settings(combination_type: str, combination: Combination, options: dict[str, Any]) -> dict[str, Any]:
    """All options with defaults filled in, after checking their names and values for this combination."""
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"add_weighted_adapter got unknown option(s) {', '.join(unknown)} for LoRA; the options are "
            f"{', '.join(OPTION_DEFAULTS)}."
        )
    # An option set away from its default that this type ignores is a mistake worth reporting.
    unused = sorted(k for k, v in options.items() if k not in combination.options and v != OPTION_DEFAULTS[k])
    if unused:
        takes = ", ".join(sorted(combination.options)) or "no options"
        raise ConfigError(
            f"combination_type {combination_type!r} does not use {', '.join(unused)} (it takes {takes}); "
            f"drop them or pick a combination type that uses them."
        )
    settings = {**OPTION_DEFAULTS, **options}
    _check_svd_settings(settings)
    if combination.needs_density:
        _check_density(combination_type, settings["density"])
    if settings["majority_sign_method"] not in SIGN_METHODS:
        raise ConfigError(
            f"majority_sign_method must be one of {SIGN_METHODS}, not {settings['majority_sign_method']!r}."
        )
    return settings


def _check_svd_settings(settings: dict[str, Any]) -> None:
    rank, clamp, driver = settings["svd_rank"], settings["svd_clamp"], settings["svd_driver"]
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ConfigError(f"svd_rank must be a positive integer (or None for the largest rank), not {rank!r}.")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 <= clamp <= 1):
        raise ConfigError(f"svd_clamp is a quantile in [0, 1] (or None for no clamping), not {clamp!r}.")
    if not isinstance(settings["svd_full_matrices"], bool):
        raise ConfigError(f"svd_full_matrices must be True or False, not {settings['svd_full_matrices']!r}.")
    if driver is not None and driver not in SVD_DRIVERS:
        raise ConfigError(f"svd_driver must be None or one of {SVD_DRIVERS} (cuSOLVER's), not {driver!r}.")


def _check_density(combination_type: str, density: Any) -> None:
    if density is None:
        raise ConfigError(
            f"combination_type {combination_type!r} prunes each adapter first: pass density, the fraction of "
            f"entries to keep, in (0, 1]."
        )
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"density is the fraction of entries to keep, in (0, 1]; got {density!r}.")


def _checked_weights(weights: list[float]) -> list[float]:
    checked = []
    for weight in weights:
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(weight, bool) or not math.isfinite(value):
            raise ConfigError(f"add_weighted_adapter weights must be finite numbers; got {weights!r}.")
        checked.append(value)
    return checked


def _check_modules_to_save(model: nn.Module, adapters: list[str]) -> None:
    # Trained copies of whole modules have no low-rank form to combine, so two of them cannot be merged.
    clashes = [
        name for name, module in iter_modules(model)
        if isinstance(module, ModulesToSave) and sum(a in module.modules_to_save for a in adapters) > 1
    ]
    if clashes:
        raise ConfigError(
            f"add_weighted_adapter cannot combine adapters that each train a copy of the same module "
            f"(modules_to_save): {', '.join(clashes)}. Combine adapters of which at most one saves each module."
        )


def _check_driver_device(model: nn.Module, adapter: str, driver: str) -> None:
    layers = adapter_layers(model, adapter)
    device = factors(layers[0][1].adapters[adapter])[0].device if layers else torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(
            f"svd_driver={driver!r} picks a cuSOLVER driver, which needs the adapters on a CUDA device; these "
            f"are on {device}. Leave svd_driver=None there."
        )


# --- the new adapter's config ---------------------------------------------------------------------


def _new_config(
    model: nn.Module, configs: list[LoraConfig], combination: Combination, svd_rank: int | None
) -> LoraConfig:
    rank = _new_rank(configs, combination, svd_rank)
    first = configs[0]
    # PiSSA would factor (and change) the base weight again, for weights that are overwritten anyway.
    init = True if is_pissa(first.init_lora_weights) else first.init_lora_weights
    return dataclasses.replace(
        first, r=rank, lora_alpha=rank, target_modules=_combined_targets(model, configs), rank_pattern={},
        alpha_pattern={}, init_lora_weights=init,
    )


def _largest_rank(config: LoraConfig) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _new_rank(configs: list[LoraConfig], combination: Combination, svd_rank: int | None) -> int:
    ranks = [_largest_rank(c) for c in configs]
    if combination.shape == "cat":
        return sum(ranks)
    if combination.shape == "svd":
        return svd_rank or max(ranks)
    if len(set(ranks)) > 1:
        raise ConfigError(
            f"Combining A and B factor by factor needs adapters of one rank; these have ranks {ranks}. Use "
            f"combination_type 'cat' or 'svd' (or a '*_svd' variant), which take any ranks."
        )
    return ranks[0]


def _combined_targets(model: nn.Module, configs: list[LoraConfig]) -> list[str] | str:
    """The union of the adapters' targets: sorted names, or one regex if every adapter targets by regex."""
    targets = [_explicit_targets(model, config) for config in configs]
    if len({isinstance(t, str) for t in targets}) > 1:
        raise ConfigError(
            f"add_weighted_adapter cannot combine adapters whose target_modules mix regexes and lists of names "
            f"({targets!r}); give them all the same form."
        )
    if isinstance(targets[0], str):
        return "|".join(f"({regex})" for regex in targets)
    return sorted(set().union(*targets))


def _explicit_targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """``target_modules`` with the model type's default for None and the layer names for ``"all-linear"``."""
    targets = resolve_target_modules(model, config)
    if targets != "all-linear":
        return targets
    head = output_head(model)
    bases = ((name, getattr(module, "base_layer", module)) for name, module in iter_modules(model))
    return [name for name, base in bases if is_linear_like(base) and base is not head]


# --- injecting the new adapter --------------------------------------------------------------------


def _inject(peft_model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """Add the adapter, leaving the random number generators as Hugging Face PEFT's injection leaves them.

    Its initial weights are overwritten, but what injection draws moves the generator, and DARE's masks
    come after: so our own draws are undone and the reference's replayed, for the same masks from one seed.
    """
    devices = sorted({p.device.index or 0 for p in peft_model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        peft_model.add_adapter(adapter_name, config)
    for _, layer in adapter_layers(peft_model.base_model.model, adapter_name):
        _replay_reference_draws(layer.adapters[adapter_name], config.init_lora_weights)


def _replay_reference_draws(adapter: LoraAdapter, init: bool | str) -> None:
    """Draw (and drop) what the reference draws creating one adapter layer, in order, shape and kind.

    Linear and Conv2d: ``A`` and ``B`` as torch layers initialise themselves (uniform), then ``A`` again by
    ``init_lora_weights`` (uniform for ``True``, normal for ``"gaussian"``). Embedding: both factors
    normal, then ``B`` again unless ``init_lora_weights`` is ``False``.
    """
    lora_a, lora_b = factors(adapter)
    if isinstance(adapter, LoraEmbedding):
        draws = [("normal_", lora_a.shape), ("normal_", lora_b.shape)] + ([("normal_", lora_b.shape)] if init else [])
    else:
        draws = [("uniform_", lora_a.shape), ("uniform_", lora_b.shape)]
        if init is True:
            draws.append(("uniform_", lora_a.shape))
        elif init == "gaussian":
            draws.append(("normal_", lora_a.shape))
    for method, shape in draws:
        getattr(torch.empty(shape), method)()  # default dtype and device, as the reference allocates


# --- combining one layer --------------------------------------------------------------------------


def factors(adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: the live factor tensors of a LoRA adapter of any layer kind."""
    if isinstance(adapter, LoraEmbedding):
        return adapter.lora_embedding_A, adapter.lora_embedding_B
    return adapter.lora_A.weight, adapter.lora_B.weight


def _combine_layer(
    name: str, layer: nn.Module, adapters: list[str], weights: list[float], combination: Combination,
    settings: dict[str, Any], rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's ``(A, B)`` for one layer, from the adapters among ``adapters`` that it has."""
    sources = [(layer.adapters[a], w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapters]
    if not sources:
        raise ConfigError(
            f"The combined adapter targets '{name}', which none of {adapters} adapts (its config comes from "
            f"{adapters[0]!r}, whose exclude_modules / layers_to_transform differ); align those settings."
        )
    with torch.no_grad():
        if combination.shape == "cat":
            return _concatenated(sources)
        if combination.shape == "factors":
            return _merged_factors(name, sources, combination.merge, settings)
        return _svd_of_merged_updates(sources, combination.merge, settings, rank)


def _concatenated(sources: list[tuple[LoraAdapter, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    # sum_i w_i s_i B_i A_i == [B_1 .. B_n] @ [w_1 s_1 A_1; ..; w_n s_n A_n], with the new scaling 1.
    lora_a = torch.cat([factors(adapter)[0] * weight * adapter.scaling for adapter, weight in sources], dim=0)
    return lora_a, torch.cat([factors(adapter)[1] for adapter, _ in sources], dim=1)


def _merged_factors(
    name: str, sources: list[tuple[LoraAdapter, float]], merge: str, settings: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = sorted({adapter.r for adapter, _ in sources})
    if len(ranks) > 1:
        raise ConfigError(
            f"'{name}' has adapters of ranks {ranks} (rank_pattern), which cannot be combined factor by factor; "
            f"use combination_type 'cat' or 'svd'."
        )
    # Split w * s between the factors so that B @ A carries it once; the sign goes on A only.
    scales = [weight * adapter.scaling for adapter, weight in sources]
    pairs = [factors(adapter) for adapter, _ in sources]
    device = pairs[0][0].device
    a_weights = torch.tensor([math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in scales], device=device)
    b_weights = torch.tensor([math.sqrt(abs(s)) for s in scales], device=device)
    density, sign_method = settings["density"], settings["majority_sign_method"]
    # A before B: the order in which DARE draws its masks.
    lora_a = merge_tensors([a for a, _ in pairs], a_weights, merge, density, sign_method)
    lora_b = merge_tensors([b for _, b in pairs], b_weights, merge, density, sign_method)
    dtype = pairs[0][0].dtype
    return lora_a.to(dtype), lora_b.to(dtype)


def _svd_of_merged_updates(
    sources: list[tuple[LoraAdapter, float]], merge: str, settings: dict[str, Any], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # Updates in the base weight's layout ((in, out) for Conv1D): DARE's masks follow the tensor's shape.
    updates = [adapter._to_layout(adapter.delta_weight()) for adapter, _ in sources]
    weights = torch.tensor([w for _, w in sources], device=updates[0].device)
    update = merge_tensors(updates, weights, merge, settings["density"], settings["majority_sign_method"])
    adapter = sources[0][0]
    matrix = _as_product_matrix(adapter, update)  # shaped like B @ A with the factors flattened
    dtype = matrix.dtype
    if dtype in (torch.float16, torch.bfloat16):  # no half-precision SVD kernels
        matrix = matrix.float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=settings["svd_full_matrices"], driver=settings["svd_driver"])
    kept = min(rank, s.shape[0])
    lora_b, lora_a = u[:, :kept] * s[:kept], vh[:kept]
    if settings["svd_clamp"] is not None:
        bound = torch.quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), settings["svd_clamp"])
        lora_b, lora_a = lora_b.clamp(-bound, bound), lora_a.clamp(-bound, bound)
    a_shape, b_shape = (tensor.shape for tensor in factors(adapter))
    return lora_a.reshape(kept, *a_shape[1:]).to(dtype), lora_b.reshape(b_shape[0], kept, *b_shape[2:]).to(dtype)


def _as_product_matrix(adapter: LoraAdapter, update: torch.Tensor) -> torch.Tensor:
    """The update as the 2-D matrix ``B @ A`` would give: (out, in), (dim, vocabulary), (out, in * kh * kw)."""
    if isinstance(adapter, LoraEmbedding):
        return update.t()
    return adapter._from_layout(update).flatten(1)


def _write(target: LoraAdapter, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Put the factors into the new adapter; ranks it does not use (a smaller layer rank, an SVD cut short)
    stay zero, which leaves ``B @ A`` as computed."""
    target_a, target_b = factors(target)
    with torch.no_grad():
        target_a.zero_()
        target_b.zero_()
        target_a[: lora_a.shape[0]].copy_(lora_a)
        target_b[:, : lora_b.shape[1]].copy_(lora_b)


# --- the merges -------------------------------------------------------------------------------------


def merge_tensors(
    tensors: list[torch.Tensor], weights: torch.Tensor, merge: str, density: float | None = None,
    sign_method: str = "total",
) -> torch.Tensor:
    """Combine same-shaped ``tensors`` with ``weights`` by ``merge`` (one of :data:`MERGES`).

    ``task_arithmetic``: the weighted sum. ``magnitude_prune``: the same after keeping each tensor's
    ``density`` largest entries by magnitude; ``dare_linear``: after keeping random entries with probability
    ``density``, rescaled by ``1 / density``. ``ties`` (magnitude pruning) and ``dare_ties`` (random pruning)
    then keep, per entry, the tensors whose sign agrees with the elected sign (``sign_method``) and average
    their weighted values.
    """
    if merge not in MERGES:
        raise ConfigError(f"merge must be one of {', '.join(MERGES)}, not {merge!r}.")
    if merge in ("ties", "magnitude_prune"):
        tensors = [prune_by_magnitude(t, density) for t in tensors]
    elif merge in ("dare_linear", "dare_ties"):
        tensors = [prune_at_random(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if merge not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    agrees = majority_sign_mask(stacked, sign_method)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def prune_at_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide by it, so the expectation is unchanged.

    The mask is ``bernoulli`` of a tensor shaped like ``tensor``, one draw per entry in row-major order, as
    the reference draws it; ``density`` 1 draws nothing.
    """
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Per entry of the stacked tensors: whether each agrees with the elected sign (ties go to +).

    ``total`` elects the sign of the sum, ``frequency`` the sign most tensors have; zeros never agree.
    """
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)
