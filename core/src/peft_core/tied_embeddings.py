"""Embeddings that are not simple: input and output embeddings sharing one weight (tied), and vocabularies
resized after the base model was published."""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn

from peft_core.errors import AdapterLoadError
from peft_core.layer import AdapterLayer
from peft_core.walk import iter_modules

# ensure_weight_tying acts, as in Hugging Face PEFT, when one of these names is in modules_to_save or targeted:
# tying for other names (GPT-2's "wte") would make files the two libraries read differently.
TIED_NAMES = ("embed_tokens", "lm_head")


def names_tied_embedding(names: list[str]) -> bool:
    """Whether ``ensure_weight_tying`` ties for these ``modules_to_save`` entries or target module names."""
    return any(name.rsplit(".", 1)[-1] in TIED_NAMES for name in names)


def tied_to_input_embedding(model: nn.Module) -> list[str]:
    """The names of the input embedding and the modules using its weight (a tied output head), the embedding
    first; empty where no other module uses it."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    weight = getattr(embedding, "weight", None)
    if weight is None:
        return []
    names = [name for name, module in iter_modules(model) if getattr(module, "weight", None) is weight]
    names.sort(key=lambda name: model.get_submodule(name) is not embedding)
    return names if len(names) > 1 else []


def mark_shared_weights(model: nn.Module) -> None:
    """Flag each adapter layer whose base weight another module uses too (input embeddings tied to the output
    head), before merging: such a layer merges into a copy, since writing in place would change the other
    module's output as well."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            weight = getattr(module.base_layer, "weight", None)
            module.weight_is_shared = weight is not None and uses[id(weight)] > 1


def record_untied_embeddings(model: nn.Module) -> None:
    """Set ``tie_word_embeddings=False`` in the config of a model whose tied input and output embeddings a merge
    made different (as Hugging Face PEFT does): transformers would otherwise tie them again (``tie_weights``,
    ``resize_token_embeddings``), and the merged head would be lost."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        weights = [getattr(m, "weight", None) for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    except (AttributeError, NotImplementedError):
        return
    if None not in weights and weights[0] is not weights[1]:
        config.tie_word_embeddings = False
        warnings.warn("The input and output embeddings are no longer tied after merging; the model's config now says "
                      "tie_word_embeddings=False.", stacklevel=3)


def check_vocabulary(
    model: nn.Module, loaded: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], source: str
) -> None:
    """Refuse, naming the fix, an adapter whose embedding tensors were saved from a resized vocabulary."""
    try:
        embeddings = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
        vocabulary = model.get_input_embeddings().weight.shape[0]
    except (AttributeError, NotImplementedError):
        return
    names = [name for name, module in iter_modules(model) if id(module) in embeddings]
    for key, tensor in loaded.items():
        target = targets.get(key)
        if target is None or tensor.dim() != target.dim() or not any(f"model.{n}." in key for n in names):
            continue
        differing = [(saved, live) for saved, live in zip(tensor.shape, target.shape, strict=True) if saved != live]
        if len(differing) == 1 and differing[0][1] == vocabulary:
            raise AdapterLoadError(
                f"The adapter in {source} was trained with a vocabulary of {differing[0][0]} tokens ({key!r} has "
                f"shape {tuple(tensor.shape)}), but this model's has {vocabulary}. Resize the base model as it was for "
                f"training, model.resize_token_embeddings({differing[0][0]}), then load the adapter."
            )
