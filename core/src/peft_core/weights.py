"""Reading and writing a base layer's weight as a dense tensor, by layer type.

Merging, DoRA and PiSSA go through these two functions, so a quantized layer (whose weight is stored
packed) works with them once its plugin registers how to dequantize and re-quantize it. Registration
needs no torch import, so a plugin can register when it is discovered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING

from peft_core.errors import PeftError
from peft_core.walk import qualified_names

if TYPE_CHECKING:
    import torch
    from torch import nn

WeightReader = Callable[["nn.Module"], "torch.Tensor"]
WeightWriter = Callable[["nn.Module", "torch.Tensor"], None]


def _read_plain(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach()


def _write_plain(layer: nn.Module, weight: torch.Tensor) -> None:
    import torch

    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))  # in place: tied weights stay tied


_WEIGHT_ACCESS: dict[str, tuple[WeightReader, WeightWriter]] = {}


def register_weight_access(qualified_name: str, read: WeightReader, write: WeightWriter) -> None:
    """Teach the core to read and write the dense weight of a layer class, e.g. a quantized Linear.

    Such a write is lossy (it re-quantizes), so ``write`` must give the layer a new weight parameter
    rather than change the old one in place: unmerging then restores the old parameter exactly.
    """
    _WEIGHT_ACCESS[qualified_name] = (read, write)


def writes_exactly(layer: nn.Module) -> bool:
    """Whether ``write_weight`` stores what it is given (plain layers) or an approximation (quantized)."""
    return _weight_access(layer)[1] is _write_plain


def _weight_access(layer: nn.Module) -> tuple[WeightReader, WeightWriter]:
    for name in qualified_names(layer):
        if name in _WEIGHT_ACCESS:
            return _WEIGHT_ACCESS[name]
    return _read_plain, _write_plain


def read_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense tensor in its stored layout (dequantized if need be), detached."""
    return _weight_access(layer)[0](layer)


def write_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Set the layer's weight from a dense tensor in its stored layout (quantizing it if need be)."""
    _weight_access(layer)[1](layer, weight)


@contextlib.contextmanager
def weights_in_memory(layer: nn.Module) -> Iterator[None]:
    """Within the block, the weights of a layer that accelerate offloads (``cpu_offload``,
    ``dispatch_model`` with offloading) are in memory; what the block changed is stored back in the offload
    store, so that merging into an offloaded model lasts. Other layers are left as they are."""
    hook = getattr(layer, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        yield
        return
    store = hook.weights_map
    target, prefix = getattr(store, "dataset", store), getattr(store, "prefix", "")
    if not isinstance(target, MutableMapping):
        raise PeftError(
            f"Cannot merge into {type(layer).__name__}: its weights are offloaded to disk, which accelerate reads "
            f"but does not write. Offload to the CPU (cpu_offload) or load the model in memory to merge."
        )
    hook.pre_forward(layer)
    try:
        yield
        for name, tensor in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
            key = prefix + name
            if key in target:
                target[key] = tensor.detach().to(target[key].device)
    finally:
        hook.post_forward(layer, None)
