"""The wrapper that takes a base layer's place and holds adapters of any method.

A method contributes an :class:`Adapter` per target layer. The wrapper applies the active, unmerged
adapters in one fixed order, the same for every method:

1. *input* adapters (``acts_on = "input"``), in activation order, each maps the input: ``x = a(x)``;
2. the base layer runs on that input;
3. *output* adapters (``acts_on = "output"``), in activation order, each maps the output given the
   layer's original input: ``out = a(x, out)`` (LoRA adds ``B(A(x))``, IA3 scales ``out``).

The base layer is never changed except by an explicit merge, so disabling or unloading is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from peft_core.errors import PeftError
from peft_core.mixed_batch import MixedBatch, current_mixed_batch
from peft_core.weights import read_weight, weights_in_memory, write_weight, writes_exactly


def getattr_through(wrapper: nn.Module, name: str, inner: str) -> Any:
    """Attribute lookup for wrappers: the wrapper's own attributes, else those of its module ``inner``."""
    try:
        return nn.Module.__getattr__(wrapper, name)
    except AttributeError:
        if name == inner:
            raise
        return getattr(nn.Module.__getattr__(wrapper, inner), name)


class Adapter(nn.Module):
    """One method's adapter for one base layer.

    Subclasses implement ``forward`` (``(x, out) -> out`` for output adapters, ``x -> x`` for
    input adapters) and, if the method can merge, ``merged_weight`` / ``unmerged_weight`` on the base
    layer's weight as stored (e.g. ``(in, out)`` for GPT-2's ``Conv1D``). ``merged_weight`` gets the
    current weight, which may hold other merged adapters, and the base weight without them, which is what
    forward computes with; a merge must make the layer compute what forward computed with the adapter
    active. Merges are undone last-in, first-out, so ``unmerged_weight`` may rely on state its own merge
    kept.
    """

    acts_on: ClassVar[str] = "output"
    # Live parameter name -> key suffix in the saved file, where Hugging Face PEFT names it otherwise.
    SAVED_NAMES: ClassVar[dict[str, str]] = {}

    def merged_weight(self, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        raise PeftError(f"{type(self).__name__} cannot be merged into its base layer.")

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise PeftError(f"{type(self).__name__} cannot be unmerged from its base layer.")

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The base bias after merging; most methods leave it alone, output scaling scales it."""
        return bias

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    @classmethod
    def forward_mixed(
        cls, adapters: Sequence[Adapter], index: torch.Tensor, x: torch.Tensor,
        out: torch.Tensor | None, cache: dict[str, Any],
    ) -> torch.Tensor:
        """Apply to each sample ``b`` the adapter ``adapters[index[b]]`` (``index[b] == len(adapters)``:
        leave it unchanged).

        ``adapters`` are this class's adapters of one layer, the same list from call to call while the
        layer's adapters do not change; ``out`` is None for input adapters. ``cache`` is the layer's own
        dict, kept across calls, for what a method derives from its weights (stacked matrices). This
        default runs each adapter on its rows; methods override it with one batched computation.
        """
        result = (x if out is None else out).clone()
        for slot, adapter in enumerate(adapters):
            rows = (index == slot).nonzero().flatten()
            if rows.numel() == 0:
                continue
            result[rows] = adapter(x[rows]) if out is None else adapter(x[rows], out[rows])
        return result

    def bind(self, base_layer: nn.Module) -> None:
        """Remember the base layer this adapter modifies (not as a submodule: the wrapper owns it)."""
        object.__setattr__(self, "base", base_layer)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their saved key suffixes (live tensors, not copies)."""
        return {self.SAVED_NAMES.get(k, k): v for k, v in self.state_dict(keep_vars=True).items()}


class AdapterLayer(nn.Module):
    """Holds a base layer and the adapters (``adapters[name]``) that modify it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # A quantized base's weight before its first merge: unmerging everything restores it exactly
        # instead of re-quantizing the arithmetic.
        self._weight_before_merge: nn.Parameter | None = None
        # Whether another module uses the base weight too (embeddings tied to the output head), set before each
        # merge: merging then writes into a copy, so the other module keeps computing with the weight as it was.
        self.weight_is_shared = False
        # What forward applies, derived from the fields above by _refresh: plain tuples, so the hot
        # path does no lookups by name.
        self._input_adapters: tuple[Adapter, ...] = ()
        self._output_adapters: tuple[Adapter, ...] = ()
        self._mixed_caches: dict[str, dict[str, Any]] = {}  # per adapter class, for forward_mixed
        self._mixed_groups: dict[tuple, list] = {}  # per slot assignment, see _by_class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = current_mixed_batch()
        if mixed is not None:
            return self._forward_mixed(x, mixed)
        if not self._output_adapters and not self._input_adapters:
            return self.base_layer(x)
        base_input = x
        for adapter in self._input_adapters:
            base_input = adapter(base_input)
        out = self.base_layer(base_input)
        for adapter in self._output_adapters:
            out = adapter(x, out)
        return out

    def _forward_mixed(self, x: torch.Tensor, mixed: MixedBatch) -> torch.Tensor:
        # Each adapter class applies its adapters to their samples in one call; the classes go in the
        # order of the wrapper (inputs, base, outputs), as a sample's own adapter would alone.
        requested = [n if n in self.adapters and not self.disabled else None for n in mixed.names]
        if not any(requested):
            return self.base_layer(x)
        index = mixed.index_for(x.shape[0], x.device)
        base_input = x
        for cls, members, slot_of in self._by_class(requested, "input"):
            base_input = cls.forward_mixed(members, slot_of.to(index.device)[index], base_input, None,
                                           self._mixed_cache(cls))
        out = self.base_layer(base_input)
        for cls, members, slot_of in self._by_class(requested, "output"):
            out = cls.forward_mixed(members, slot_of.to(index.device)[index], x, out, self._mixed_cache(cls))
        return out

    def _by_class(
        self, requested: list[str | None], acts_on: str
    ) -> list[tuple[type[Adapter], list[Adapter], torch.Tensor]]:
        """Per adapter class acting on ``acts_on``: all this layer's adapters of the class (a stable list,
        so what a class derives from them is kept across calls), and a map from the call's slots (and the
        base slot after them) to positions in that list, ``len(list)`` meaning none. Remembered per
        assignment until the layer's adapters change, so generation steps do not redo it."""
        key = (acts_on, *requested)
        remembered = self._mixed_groups  # the dict of the adapters read below, even if _refresh replaces it
        found = remembered.get(key)
        if found is not None:
            return found
        groups = []
        for cls in dict.fromkeys(type(self.adapters[n]) for n in requested if n is not None):
            members = [a for a in self.adapters.values() if type(a) is cls and a.acts_on == acts_on]
            if not members:
                continue
            position = {id(a): i for i, a in enumerate(members)}
            slot_of = [position.get(id(self.adapters[n]), len(members)) if n is not None else len(members)
                       for n in requested]
            groups.append((cls, members, torch.tensor([*slot_of, len(members)])))
        remembered[key] = groups
        return groups

    def _mixed_cache(self, cls: type) -> dict[str, Any]:
        return self._mixed_caches.setdefault(cls.__qualname__, {})

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterLayer:
        # .to(), .half(), .cuda() swap tensor data without moving version counters, so what forward_mixed
        # derived from the weights would keep the old dtype, device and values: drop it.
        result = super()._apply(fn, recurse)
        self._forget_derived()
        return result

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of the layer it built (``.weight``, ``.in_features``, ...).
        return getattr_through(self, name, "base_layer")

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "base_layer" and "adapters" in self._modules:  # e.g. a dequantized replacement
            for adapter in self.adapters.values():
                adapter.bind(value)

    # --- adapter state ------------------------------------------------------------------------

    def add(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise PeftError(f"This layer already has an adapter named {name!r}; delete it first.")
        adapter.bind(self.base_layer)
        self.adapters[name] = adapter
        self._forget_derived()
        self._refresh()

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge(name)
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._forget_derived()
        self._refresh()

    def _forget_derived(self) -> None:
        # What forward_mixed derived from the old adapters (LoRA's stacked copies) is keyed by adapter ids,
        # which a new adapter may reuse once the old one is freed: drop it, and free its memory now. A new
        # dict, not clear(), as in _refresh.
        self._mixed_caches = {}

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self._refresh()

    def _refresh(self) -> None:
        self._mixed_groups = {}  # a new dict, not clear(): a call in another thread may be reading the old
        live = [] if self.disabled else [
            self.adapters[n] for n in self.active_adapters if n not in self.merged_adapters
        ]
        self._input_adapters = tuple(a for a in live if a.acts_on == "input")
        self._output_adapters = tuple(a for a in live if a.acts_on == "output")

    # --- merging ------------------------------------------------------------------------------

    def _merged_weight(self, name: str) -> torch.Tensor:
        weight = read_weight(self.base_layer)
        return self.adapters[name].merged_weight(weight, self._without_merged(weight))

    def _without_merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with every merged adapter taken out (``weight`` itself if none is merged)."""
        for name in reversed(self.merged_adapters):
            weight = self.adapters[name].unmerged_weight(weight)
        return weight

    def check_merge(self, name: str, where: str = "") -> None:
        """Raise if merging adapter ``name`` would put NaN or Inf into the base weight."""
        with torch.no_grad(), weights_in_memory(self.base_layer):
            finite = torch.isfinite(self._merged_weight(name)).all()
        if not finite:
            raise PeftError(
                f"Merging adapter {name!r} into {where or type(self.base_layer).__name__} gives NaN or Inf "
                f"weights; the model was left unchanged. Check the adapter's weights (a diverged training "
                f"run?) before merging."
            )

    def merge(self, name: str) -> None:
        if name in self.merged_adapters or name not in self.adapters:
            return
        outputs = [n for n in self.merged_adapters if self.adapters[n].acts_on == "output"]
        if self.adapters[name].acts_on == "input" and outputs:
            # Forward feeds an input adapter's result to the base layer alone, beneath every output adapter
            # (LoRA sees the original input): merge it under the merged output adapters, not on top of them.
            later = self.merged_adapters[self.merged_adapters.index(outputs[0]):]
            for other in reversed(later):
                self.unmerge(other)
            self.merge(name)
            for other in later:
                self.merge(other)
            return
        if not self.merged_adapters:
            self._keep_weight_before_merge()
        with torch.no_grad(), weights_in_memory(self.base_layer):
            write_weight(self.base_layer, self._merged_weight(name))
            self._map_bias(self.adapters[name].merged_bias)
        self.merged_adapters.append(name)
        self._refresh()

    def _keep_weight_before_merge(self) -> None:
        # A quantized write only approximates, and a shared weight must stay as it is for its other users: keep
        # the weight parameter, merge into a new one, and put the kept one back once everything is unmerged.
        exact = writes_exactly(self.base_layer)
        if exact and not self.weight_is_shared:
            return
        kept = self._weight_before_merge = self.base_layer.weight
        if exact:  # a plain write is in place: give the layer its own weight first
            self.base_layer.weight = nn.Parameter(kept.detach().clone(), requires_grad=kept.requires_grad)

    def _map_bias(self, change) -> None:
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            bias.copy_(change(bias.detach()).to(bias.dtype))

    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            return
        # Merges do not commute for every method (scaling, DoRA): undo the later ones first, then
        # merge them again.
        later = self.merged_adapters[self.merged_adapters.index(name) + 1 :]
        with torch.no_grad(), weights_in_memory(self.base_layer):
            weight = read_weight(self.base_layer)
            for other in [*reversed(later), name]:
                weight = self.adapters[other].unmerged_weight(weight)
                self._map_bias(self.adapters[other].unmerged_bias)
                self.merged_adapters.remove(other)
            if not self.merged_adapters and self._weight_before_merge is not None:
                self.base_layer.weight, self._weight_before_merge = self._weight_before_merge, None
            else:
                write_weight(self.base_layer, weight)
        for other in later:
            self.merge(other)
        self._refresh()


def adapter_placement(
    base_layer: nn.Module, autocast_adapter_dtype: bool = True
) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for a new adapter of ``base_layer``.

    Adapters live where the base computes: on the execution device of an accelerate offload hook when
    the weights themselves sit on ``meta``. They take the base weight's floating dtype, except that with
    ``autocast_adapter_dtype`` (the default, as in Hugging Face PEFT) dtypes narrower than float32
    (float16, bfloat16, float8) become float32, because low-precision adapter weights train poorly.
    Quantized bases (integer weights) get float32 adapters either way.
    """
    weight = next(base_layer.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    if device.type == "meta":
        hook = getattr(base_layer, "_hf_hook", None)
        execution_device = getattr(hook, "execution_device", None)
        if execution_device is not None:
            device = torch.device(execution_device)
    if weight is None or not weight.is_floating_point():
        return device, torch.float32
    if autocast_adapter_dtype and weight.dtype.itemsize < 4:
        return device, torch.float32
    return device, weight.dtype
