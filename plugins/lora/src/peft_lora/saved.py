"""A saved LoRA read without a model: the names of its factors, each module's rank, and what ``peft inspect``
shows about it (the ``peft_describe`` hook).

The rank is not in a file's keys or its config alone (patterns, pruning, a foreign writer): it is the first
dimension of each module's A factor, which is what these functions read. AdaLoRA, whose factors are named
alike, uses them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SAVED_PREFIX = "base_model.model."  # saved keys' prefix (the Hugging Face PEFT layout)
# Key endings of the tensors a LoRA file holds, after the module path (the PEFT layout, which diffusers shares).
FACTOR_SUFFIXES = (
    "lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B",
)
# The A factors, shaped (r, ...): a Linear's or Conv2d's A, and an Embedding's (r, num_embeddings).
A_SUFFIXES = ("lora_A.weight", "lora_embedding_A")
# Config fields that say how big a LoRA is; `peft inspect` shows those that are set.
SIZE_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern")


def factor_ranks(
    tensors: Iterable[tuple[str, torch.Tensor]], a_suffixes: tuple[str, ...] = A_SUFFIXES
) -> dict[str, int]:
    """Module path (the key without its factor's name) -> rank, for each A factor among ``tensors``' items."""
    return {
        key.rsplit(".lora_", 1)[0]: int(tensor.shape[0])
        for key, tensor in tensors
        if key.endswith(a_suffixes) and tensor.dim() >= 1
    }


def describe(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], size_fields: tuple[str, ...] = SIZE_FIELDS,
    a_suffixes: tuple[str, ...] = A_SUFFIXES,
) -> dict[str, Any]:
    """The config's size fields that are set, and ``ranks_in_file``: the distinct ranks the factors really have
    (what a pattern, or AdaLoRA's pruning, left)."""
    described = {name: config[name] for name in size_fields if config.get(name) not in (None, {}, [])}
    described["ranks_in_file"] = sorted(set(factor_ranks(tensors.items(), a_suffixes).values()))
    return described
