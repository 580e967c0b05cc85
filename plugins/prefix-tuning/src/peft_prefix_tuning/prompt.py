"""The prefix table, its optional projection, and where its rows go."""

from __future__ import annotations

from peft_core.soft_prompt import PrefixLayout, SoftPrompt, decoder_only_sources, encoder_decoder_sources
from torch import nn

from peft_prefix_tuning.config import PrefixTuningConfig


def build_prompt(config: PrefixTuningConfig, encoder_decoder: bool) -> SoftPrompt:
    # One row per virtual token holds every layer's key and value.
    width = config.num_layers * 2 * config.token_dim
    if config.prefix_projection and not config.inference_mode:
        embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        encoder = nn.Sequential(
            nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
            nn.Linear(config.encoder_hidden_size, width),
        )
    else:  # no projection, or an adapter built for inference, which holds the saved final rows
        embedding, encoder = nn.Embedding(config.num_virtual_tokens, width), None
    sources = (encoder_decoder_sources if encoder_decoder else decoder_only_sources)(config.num_layers)
    layout = PrefixLayout(config.num_attention_heads, config.token_dim // config.num_attention_heads, sources)
    return SoftPrompt(config.num_virtual_tokens, embedding, encoder, prefix=layout)
