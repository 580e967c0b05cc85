"""Tiny transformers models built from configs, saved and loaded back, so tests go through the real
``from_pretrained`` path without downloading anything."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
    ))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128))


def _bert_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=128, num_labels=3,
    ))


TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": _llama, "gpt2": _gpt2, "bert-classifier": _bert_classifier,
}


def tiny_model(kind: str, directory: str | os.PathLike, seed: int = 0, **load_kwargs: Any) -> nn.Module:
    """Build the tiny ``kind`` model with ``seed``, save it in ``directory`` (once) and load it back."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        torch.manual_seed(seed)
        TINY_MODELS[kind]().save_pretrained(directory)
    loader = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM,
              "bert-classifier": AutoModelForSequenceClassification}.get(kind, AutoModel)
    return loader.from_pretrained(directory, **load_kwargs).eval()
