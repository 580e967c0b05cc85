"""What ``peft inspect`` shows of a saved LoRA, through the plugin's ``peft_describe``: its size fields and the
ranks its factors really have, embeddings included."""

from __future__ import annotations

import torch
from peft_core import get_peft_model
from peft_core.cli.inspect import describe
from peft_lora import LoraConfig
from peft_lora.plugin import peft_describe
from torch import nn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(3, 4, kernel_size=3)


def test_inspect_shows_the_config_sizes_and_the_ranks_in_the_file(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "lin", "conv"], rank_pattern={"emb": 2, "conv": 3},
                        alpha_pattern={"lin": 16})
    get_peft_model(Block(), config).save_pretrained(tmp_path)
    info = describe(str(tmp_path))
    assert info["peft_type"] == "LORA"
    assert (info["r"], info["lora_alpha"]) == (4, 8)
    assert info["rank_pattern"] == {"emb": 2, "conv": 3} and info["alpha_pattern"] == {"lin": 16}
    assert info["ranks_in_file"] == [2, 3, 4]  # the embedding's (r, num_embeddings) factor counts too
    # Placed where the core shows a method's fields: after the targets, before the counts.
    keys = list(info)
    assert keys.index("target_modules") < keys.index("r") < keys.index("ranks_in_file") < keys.index("parameters")


def test_only_lora_adapters_are_described():
    assert peft_describe(config={"peft_type": "IA3"}, tensors={}) is None
    described = peft_describe(config={"peft_type": "LORA", "r": 8, "rank_pattern": {}}, tensors={
        "base_model.model.q.lora_A.weight": torch.zeros(8, 4), "base_model.model.q.lora_B.weight": torch.zeros(4, 8),
        "base_model.model.k.lora_A.weight": torch.zeros(5, 4),
    })
    assert described == {"r": 8, "ranks_in_file": [5, 8]}  # an empty pattern is not shown
