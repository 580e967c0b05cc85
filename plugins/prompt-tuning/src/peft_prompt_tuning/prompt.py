"""The prompt table and its three ways to start."""

from __future__ import annotations

import itertools

import torch
from peft_core.soft_prompt import SoftPrompt
from torch import nn

from peft_prompt_tuning.config import PromptTuningConfig


def build_prompt(model: nn.Module, config: PromptTuningConfig) -> SoftPrompt:
    embedding = nn.Embedding(config.total_virtual_tokens, config.token_dim)
    # A loaded adapter (built for inference) is overwritten by the file; only a new one is initialised.
    if config.prompt_tuning_init != "RANDOM" and not config.inference_mode:
        word_embeddings = model.get_input_embeddings()
        ids = initial_token_ids(config, word_embeddings.num_embeddings).to(word_embeddings.weight.device)
        with torch.no_grad():
            embedding.weight.copy_(word_embeddings(ids).float())
    return SoftPrompt(config.num_virtual_tokens, embedding)


def initial_token_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor:
    """One token id per prompt row: sampled, or the init text's ids repeated and cut to length."""
    rows = config.total_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (rows,), dtype=torch.long)
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs, trust_remote_code=False)
    text_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    return torch.tensor(list(itertools.islice(itertools.cycle(text_ids), rows)), dtype=torch.long)
