"""Tiny transformers models built from configs, saved and loaded back, so tests go through the real
``from_pretrained`` path without downloading anything."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A custom (non-transformers) model: three Conv2d layers (3x3, strided 3x3, 1x1) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 6, kernel_size=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 8, 8) -> (B, 5)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return self.head(x.flatten(1))


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


def _llama_classifier() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, num_labels=3, pad_token_id=0,
    ))


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=128, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    ))


TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": _llama, "gpt2": _gpt2, "bert-classifier": _bert_classifier, "llama-classifier": _llama_classifier,
    "t5": _t5,
}


def tiny_model(kind: str, directory: str | os.PathLike, seed: int = 0, **load_kwargs: Any) -> nn.Module:
    """Build the tiny ``kind`` model with ``seed``, save it in ``directory`` (once) and load it back."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        torch.manual_seed(seed)
        TINY_MODELS[kind]().save_pretrained(directory)
    loader = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM,
              "bert-classifier": AutoModelForSequenceClassification,
              "llama-classifier": AutoModelForSequenceClassification, "t5": AutoModelForSeq2SeqLM}.get(kind, AutoModel)
    return loader.from_pretrained(directory, **load_kwargs).eval()


def tiny_tokenizer(directory: str | os.PathLike, vocab_size: int = 128) -> str:
    """Save a word-level tokenizer for the tiny models in ``directory``; return the directory.

    Token ``i`` is the word ``w{i}`` (``w0`` is padding, ``w1`` the unknown word), so a text like
    ``"w5 w9"`` tokenizes to ``[5, 9]``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0", unk_token="w1")
    tokenizer.save_pretrained(directory)
    return os.fspath(directory)
