"""Tensors of the base model that an adapter replaces, and giving them back.

An adapter's file may hold values for tensors of the base model itself where its config says so: biases
its method trains (declared through the ``peft_state_dict`` hook), the original module of a
``modules_to_save`` entry, and the weight of an embedding layer it targets (Hugging Face PEFT saves those,
``save_embedding_layers``). Loading such a file overwrites a tensor that every adapter of the model
shares, so:

* a key that addresses a base tensor the config does not declare is refused (:func:`declared_base_tensors`);
* the original of every base tensor an adapter may change is kept, on the CPU, and written back when the
  adapter is deleted or unloaded, so loading then deleting leaves the base bit-identical
  (:class:`BaseTensorClaims`);
* two adapters may not both change one base tensor: deleting one would undo the other's values.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from peft_core.errors import AdapterLoadError, PeftError
from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSave
from peft_core.soft_prompt import ATTRIBUTE as SOFT_PROMPTS
from peft_core.walk import iter_modules

SAVED_PREFIX = "base_model.model."  # saved keys, and PeftModel's parameter names, start with it


def adapter_owned_ids(model: nn.Module) -> set[int]:
    """The ids of every tensor adapters own: layer adapters, ``modules_to_save`` copies, soft prompts."""
    owned: list[nn.Module] = []
    for _, module in iter_modules(model):
        if isinstance(module, AdapterLayer):
            owned.append(module.adapters)
        elif isinstance(module, ModulesToSave):
            owned.append(module.modules_to_save)
    if hasattr(model, SOFT_PROMPTS):
        owned.append(getattr(model, SOFT_PROMPTS))
    return {id(t) for m in owned for t in (*m.parameters(), *m.buffers())}


def base_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` (saved key -> live tensor) that are tensors of the base model itself."""
    owned = adapter_owned_ids(model)
    candidates = {key: t for key, t in tensors.items() if id(t) not in owned}
    if not candidates:  # the common case, and walking a 7B model's every tensor costs a tenth of an injection
        return {}
    live = {id(t) for t in (*model.parameters(), *model.buffers())}  # not derived tensors (for_saving)
    return {key: t for key, t in candidates.items() if id(t) in live}


def _embedding_weights(model: nn.Module) -> set[int]:
    """The ids of the input and output embeddings' weights (through any adapter wrapper)."""
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            embedding = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        weight = getattr(embedding, "weight", None)
        if isinstance(weight, torch.Tensor):
            found.add(id(weight))
    return found


def declared_base_tensors(
    model: nn.Module, live: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
    adapter_name: str, source: str, allow_embedding_layers: bool = False,
) -> dict[str, torch.Tensor]:
    """Live tensors for the saved keys beyond ``targets`` (the method's own mapping) that address base tensors
    this adapter's config declares: its ``modules_to_save`` originals and the weights of embedding layers it
    targets (or, with ``allow_embedding_layers``, any input or output embedding weight).

    ``live`` maps names as saved keys spell them (``base_model.model.<path>``) to the model's tensors. A key
    that addresses any other tensor of the model (a norm's weight, another adapter's factor) is refused,
    naming it; keys that address nothing are left to the caller, which refuses them as unexpected.
    """
    embeddings = _embedding_weights(model)
    declared: set[int] = set()
    for _, module in iter_modules(model):
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            declared |= {id(t) for t in (*module.original_module.parameters(), *module.original_module.buffers())}
        elif isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            weight = getattr(module.base_layer, "weight", None)
            if weight is not None and id(weight) in embeddings:
                declared.add(id(weight))
    if allow_embedding_layers:
        declared |= embeddings
    own = {id(t) for t in targets.values()}
    found = {}
    for key in loaded:
        if key in targets:
            continue
        # Hugging Face PEFT leaves the adapter name out of a modules_to_save copy's key.
        name = key.replace(".modules_to_save.", f".modules_to_save.{adapter_name}.")
        tensor = live.get(name, live.get(key))
        if tensor is None:
            continue
        if id(tensor) not in declared and id(tensor) not in own:
            raise AdapterLoadError(_undeclared_message(key, source, id(tensor) in embeddings))
        found[key] = tensor
    return found


def _undeclared_message(key: str, source: str, is_embedding: bool) -> str:
    hint = (
        "; if the adapter was trained on a resized vocabulary and saved its embeddings with it (Hugging Face "
        "PEFT's save_embedding_layers), and you trust its source, load it with allow_embedding_layers=True"
        if is_embedding else ""
    )
    return (
        f"The adapter in {source} holds {key!r}, a tensor of the base model (or of another adapter) that its config "
        f"does not declare: an adapter may replace only the biases its method trains, its modules_to_save and the "
        f"embedding layers it targets. Loading it would silently change the model under every adapter, so it is "
        f"refused. Remove the key from the file{hint}."
    )


class BaseTensorClaims:
    """The base tensors each adapter may change, with their original values, to give back on delete."""

    def __init__(self) -> None:
        self._originals: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def owner(self, tensor: torch.Tensor) -> str | None:
        return next((name for name, pairs in self._originals.items() if any(t is tensor for t, _ in pairs)), None)

    def check_free(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse tensors (saved key -> live tensor) that another adapter already changes."""
        for key, tensor in tensors.items():
            other = self.owner(tensor)
            if other not in (None, adapter_name):
                raise PeftError(
                    f"Adapter {adapter_name!r} would change {key.removeprefix(SAVED_PREFIX)!r}, a base-model tensor "
                    f"that adapter {other!r} already changes (it trains or loaded it); deleting either would undo "
                    f"the other. Delete or merge {other!r} first, or train the bias in only one of them "
                    f"(bias='none' in the other)."
                )

    def claim(self, adapter_name: str, tensors: Iterable[torch.Tensor]) -> None:
        """Keep the current values of ``tensors`` as the originals ``adapter_name`` gives back."""
        pairs = self._originals.setdefault(adapter_name, [])
        for tensor in tensors:
            if tensor.is_meta or any(t is tensor for t, _ in pairs):
                continue
            pairs.append((tensor, tensor.detach().to("cpu", copy=True)))

    def changed(self, adapter_name: str) -> list[torch.Tensor]:
        """The claimed tensors whose values differ from their originals now."""
        return [
            t for t, original in self._originals.get(adapter_name, [])
            if not torch.equal(t.detach().to("cpu"), original)
        ]

    def restore(self, adapter_name: str) -> None:
        """Write the originals back and forget them."""
        with torch.no_grad():
            for tensor, original in self._originals.pop(adapter_name, []):
                tensor.copy_(original.to(tensor.device))

    def release(self, adapter_name: str) -> None:
        """Forget the originals, keeping the adapter's values (it was merged into the model)."""
        self._originals.pop(adapter_name, None)

    def names(self) -> list[str]:
        return list(self._originals)


def changes_values(targets: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``targets`` whose loaded values differ from the live ones."""
    return {
        key: t for key, t in targets.items()
        if not t.is_meta and not torch.equal(t.detach().to("cpu"), loaded[key].to(t.dtype))
    }
