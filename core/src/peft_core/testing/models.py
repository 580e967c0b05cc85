"""Tiny transformers models built from configs, saved and loaded back, so tests go through the real
``from_pretrained`` path without downloading anything.

Each saved model is marked with what it is (:data:`MARKER_NAME`), so a folder is only ever loaded as the
kind and seed it was saved with. Without a directory, models are kept in a per-process temporary folder,
one subfolder per kind and seed, removed when the process exits: nothing lands in the working directory,
and no other process (another test run, a later version of these models) shares them.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_core.errors import ConfigError


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


MARKER_NAME = "peft_core_tiny_model.json"  # {"kind": ..., "seed": ...}, written after the model's files
_LOADERS = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "t5": "AutoModelForSeq2SeqLM",
            "bert-classifier": "AutoModelForSequenceClassification",
            "llama-classifier": "AutoModelForSequenceClassification"}
_lock = threading.Lock()  # tests load models from several threads; a model is saved once
_cache_root: Path | None = None


def tiny_model(kind: str, directory: str | os.PathLike | None = None, seed: int = 0, **load_kwargs: Any) -> nn.Module:
    """The tiny ``kind`` model built with ``seed``, saved (once) and loaded back with ``from_pretrained``.

    ``directory`` defaults to a per-process cache folder for this kind and seed (see
    :func:`saved_tiny_model`). ``load_kwargs`` go to ``from_pretrained`` (``dtype=torch.bfloat16``, ...).
    """
    import transformers

    path = saved_tiny_model(kind, directory, seed)
    loader = getattr(transformers, _LOADERS.get(kind, "AutoModel"))
    return loader.from_pretrained(path, **load_kwargs).eval()


def saved_tiny_model(kind: str, directory: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The folder holding the tiny ``kind`` model built with ``seed``: saved there on first use.

    Without ``directory``, a subfolder of a temporary folder of this process. A ``directory`` that already
    holds a model is used only if it is this kind and seed; any other content is refused (a
    :class:`~peft_core.errors.ConfigError`), never loaded in its place.
    """
    if kind not in TINY_MODELS:
        raise ConfigError(f"No tiny model of kind {kind!r}; the kinds are {', '.join(sorted(TINY_MODELS))}.")
    path = _cache_root_dir() / f"{kind}-seed{seed}" if directory is None else Path(directory)
    with _lock:
        if _saved_kind(path) == {"kind": kind, "seed": seed}:
            return path
        if path.is_dir() and any(path.iterdir()):
            raise ConfigError(
                f"{path} holds {_describe(path)}, not the tiny {kind!r} model with seed {seed}. Pass an empty or "
                f"new directory, or none (the default) to use a per-process folder for each kind."
            )
        torch.manual_seed(seed)
        TINY_MODELS[kind]().save_pretrained(path)
        # Written last: a save that failed halfway leaves no marker, so it is refused, not loaded.
        (path / MARKER_NAME).write_text(json.dumps({"kind": kind, "seed": seed}))
    return path


def _saved_kind(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _describe(path: Path) -> str:
    saved = _saved_kind(path)
    if saved is not None:
        return f"the tiny {saved.get('kind')!r} model with seed {saved.get('seed')}"
    if (path / "config.json").is_file():
        return "a model that tiny_model did not save (it has no " + MARKER_NAME + ")"
    return "other files"


def _cache_root_dir() -> Path:
    """This process's folder of tiny models, created on first use and removed at exit."""
    global _cache_root
    with _lock:
        if _cache_root is None:
            _cache_root = Path(tempfile.mkdtemp(prefix="peft-core-tiny-models-"))
            owner = os.getpid()  # a forked child inherits the path, but the folder is not its to remove
            atexit.register(lambda root=_cache_root: os.getpid() == owner and shutil.rmtree(root, ignore_errors=True))
        return _cache_root


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
