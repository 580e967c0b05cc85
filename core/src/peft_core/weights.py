"""Reading and writing a base layer's weight as a dense tensor, by layer type.

Merging, DoRA and PiSSA go through these two functions, so a quantized layer (whose weight is stored
packed) works with them once its plugin registers how to dequantize and re-quantize it
(``peft_register_layer_types``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING

from peft_core.errors import PeftError
from peft_core.walk import qualified_names

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peft_core.plugins import LayerType


def _registered(layer: nn.Module) -> LayerType | None:
    from peft_core.plugins import registry

    found = registry().layer_type(qualified_names(layer))
    return found if found is not None and found.read_weight is not None else None


def writes_exactly(layer: nn.Module) -> bool:
    """Whether ``write_weight`` stores what it is given (plain layers) or an approximation (quantized)."""
    return _registered(layer) is None


def read_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense tensor in its stored layout (dequantized if need be), detached."""
    registered = _registered(layer)
    return layer.weight.detach() if registered is None else registered.read_weight(layer)


def write_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Set the layer's weight from a dense tensor in its stored layout (quantizing it if need be)."""
    registered = _registered(layer)
    if registered is not None:
        registered.write_weight(layer, weight)
        return
    import torch

    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))  # in place: tied weights stay tied


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
