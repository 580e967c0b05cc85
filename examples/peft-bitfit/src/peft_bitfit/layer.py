"""BitFit adapters: a trained vector added to a layer's output, ``out + delta``, and its merge into the bias.

The adapter is an *output* adapter of peft-core's wrapper, so the base layer, its bias included, stays
untouched until an explicit merge. Merging folds ``delta`` into the base bias through ``merged_bias``; the
weight is left alone. A layer built without a bias (``nn.Linear(..., bias=False)``) has nothing to fold
into, and peft-core's wrapper skips the bias of such a layer, so :func:`merge_bitfit` first gives it a
zero bias and :func:`unmerge_bitfit` takes that bias away again: merged, the layer computes what the
adapter computed; unmerged, it is the layer it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft_core.errors import ConfigError, PeftError
from peft_core.inject import LayerTable
from peft_core.layer import Adapter, AdapterLayer
from peft_core.walk import iter_modules
from torch import nn

from peft_bitfit.config import BitFitConfig


class BitFitAdapter(Adapter):
    """A bias delta for one layer: ``out + bitfit_bias``, one entry per output feature."""

    acts_on = "output"

    def __init__(self, out_features: int) -> None:
        super().__init__()
        # Zero: the model starts unchanged, as a layer that never had a bias computes with bias zero.
        self.bitfit_bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        delta = self.bitfit_bias
        # The delta is float32 on a half-precision base (adapter_placement); compute in the output's dtype.
        return out + (delta if delta.dtype == out.dtype else delta.to(out.dtype))

    @classmethod
    def forward_mixed(
        cls, adapters: Sequence[Adapter], index: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None,
        cache: dict[str, Any],
    ) -> torch.Tensor:
        """Each sample gets its own adapter's delta, gathered from the stacked deltas (zeros: no adapter)."""
        deltas = [a.bitfit_bias.to(out.dtype) for a in adapters]
        table = torch.stack([*deltas, torch.zeros_like(deltas[0])])  # (adapters + 1, features)
        per_sample = torch.index_select(table, 0, index)  # (batch, features)
        return out + per_sample.view(out.shape[0], *[1] * (out.dim() - 2), -1)

    def merged_weight(self, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        return weight  # BitFit changes no weight

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.bitfit_bias.detach().to(bias.dtype)

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias - self.bitfit_bias.detach().to(bias.dtype)


BITFIT_LAYERS = LayerTable({
    "torch.nn.modules.linear.Linear":
        lambda base, config, adapter_name, name: BitFitAdapter(base.out_features),
    # GPT-2's Conv1D stores its weight as (in, out).
    "transformers.pytorch_utils.Conv1D":
        lambda base, config, adapter_name, name: BitFitAdapter(base.weight.shape[1]),
})


def has_bias(layer: nn.Module) -> bool:
    """Whether the base layer (unwrapped if need be) has a bias of its own."""
    base = layer.base_layer if isinstance(layer, AdapterLayer) else layer
    return getattr(base, "bias", None) is not None


def check_missing_biases(targets: list[tuple[str, nn.Module]], config: BitFitConfig) -> list[tuple[str, nn.Module]]:
    """The targets to adapt, given ``config.missing_bias``; raises ConfigError where the config says so."""
    if config.missing_bias == "add":
        return targets
    without = [name for name, module in targets if not has_bias(module)]
    kept = [(name, module) for name, module in targets if has_bias(module)]
    if config.missing_bias == "error" and without:
        raise ConfigError(
            f"BitFitConfig(missing_bias='error'): {len(without)} target layers have no bias, e.g. "
            f"{', '.join(without[:3])}. Use missing_bias='add' to give them a trainable bias starting at zero, "
            f"missing_bias='skip' to leave them out, or narrow target_modules."
        )
    if not kept:
        raise ConfigError(
            f"BitFitConfig(missing_bias='skip'): none of the {len(targets)} target layers has a bias, so "
            f"nothing would train. Use missing_bias='add' or target layers that have biases."
        )
    return kept


# --- merging ---------------------------------------------------------------------------------------------

# Set on the wrapper (not the base layer, not an adapter) whose base got its bias from a BitFit merge: the
# mark must outlive the adapter that merged first (it may be deleted while another stays merged) and must
# not outlive the wrapper (after merge_and_unload the bias belongs to the plain model).
ADDED_BIAS = "_bitfit_added_bias"


def adapter_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, AdapterLayer]]:
    """The wrappers holding an adapter named ``adapter_name``, with their module names."""
    return [
        (name, module) for name, module in iter_modules(model)
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters
    ]


def merge_bitfit(model: nn.Module, adapter_name: str, safe_merge: bool) -> None:
    """Fold the adapter's deltas into the base biases, giving bias-less layers a zero bias first."""
    layers = adapter_layers(model, adapter_name)
    if safe_merge:  # check every layer before changing any, so a failure leaves the model as it was
        for name, layer in layers:
            if not torch.isfinite(layer.adapters[adapter_name].bitfit_bias).all():
                raise PeftError(
                    f"Merging adapter {adapter_name!r} into {name} gives NaN or Inf biases; the model was left "
                    f"unchanged. Check the adapter's weights (a diverged training run?) before merging."
                )
    for _, layer in layers:
        adapter = layer.adapters[adapter_name]
        base = layer.base_layer
        if adapter_name not in layer.merged_adapters and getattr(base, "bias", None) is None:
            weight = base.weight
            dtype = weight.dtype if weight.dtype.is_floating_point else adapter.bitfit_bias.dtype
            # Frozen, like the rest of the base; the wrapper's merge then adds the delta to it.
            zero = torch.zeros(adapter.bitfit_bias.shape, dtype=dtype, device=weight.device)
            base.register_parameter("bias", nn.Parameter(zero, requires_grad=False))
            setattr(layer, ADDED_BIAS, True)
        layer.merge(adapter_name)


def unmerge_bitfit(model: nn.Module, adapter_name: str) -> None:
    """Take the adapter's deltas out of the base biases, and remove a bias its merge added."""
    for _, layer in adapter_layers(model, adapter_name):
        layer.unmerge(adapter_name)
        _drop_added_bias(layer)


def _drop_added_bias(layer: AdapterLayer) -> None:
    # The added bias goes when no BitFit adapter of the layer is merged any more: it then holds zero (other
    # methods' merges scale the bias or leave it, they add nothing), and the layer is again bias-less.
    if not getattr(layer, ADDED_BIAS, False):
        return
    if any(isinstance(layer.adapters[n], BitFitAdapter) for n in layer.merged_adapters):
        return
    layer.base_layer.register_parameter("bias", None)
    setattr(layer, ADDED_BIAS, False)
