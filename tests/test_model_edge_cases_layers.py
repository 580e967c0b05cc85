"""``layers_to_transform`` on models whose blocks live at other paths than ``model.layers.N``.

GPT-2 and Falcon (``transformer.h.N``), T5 (``encoder.block.N`` and ``decoder.block.N``), BERT
(``encoder.layer.N``), GPT-NeoX (``gpt_neox.layers.N``), a diffusers UNet (``down_blocks.N.attentions.M``) and a
custom backbone (``backbone.stages.N.blocks.M``): with ``layers_pattern`` given (a name, a regex or a list) or
left to its default, the adapted modules are exactly those Hugging Face PEFT 0.21.2 adapts for the same config,
and they sit in the blocks asked for. Indices or patterns that name no block raise a ``ConfigError``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from peft_core import AdapterLayer, ConfigError, PeftModel, get_peft_model
from peft_lora import LoraConfig
from torch import nn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Backbone(nn.Module):
    """A custom torch model whose blocks are ``backbone.stages.N.blocks.M``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stages = nn.ModuleList(Stage() for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.backbone.stages:
            x = stage(x)
        return self.head(x)


def _transformers(config_class: str, model_class: str, **config: Any) -> nn.Module:
    import transformers

    return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))


def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


SMALL = dict(num_hidden_layers=3, num_attention_heads=4, vocab_size=128)
MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": lambda: _transformers("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=3, n_head=4, vocab_size=128),
    "t5": lambda: _transformers("T5Config", "T5ForConditionalGeneration", d_model=32, d_ff=64, d_kv=8, num_layers=3,
                                num_heads=4, vocab_size=128, decoder_start_token_id=0),
    "bert": lambda: _transformers("BertConfig", "BertForSequenceClassification", hidden_size=32,
                                  intermediate_size=64, **SMALL),
    "falcon": lambda: _transformers("FalconConfig", "FalconForCausalLM", hidden_size=32, **SMALL),
    "gpt_neox": lambda: _transformers("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=32, intermediate_size=64,
                                      **SMALL),
    "llama_bare": lambda: _transformers("LlamaConfig", "LlamaModel", hidden_size=32, intermediate_size=64,
                                        num_key_value_heads=2, **SMALL),
    "unet": _unet,
    "custom": Backbone,
}


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().eval()


def hf_adapted(kind: str, settings: dict[str, Any]) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build(kind), peft.LoraConfig(**settings))
    return sorted(name.removeprefix("base_model.model.") for name, module in model.named_modules()
                  if isinstance(module, peft.tuners.lora.LoraLayer))


def adapted(model: PeftModel) -> list[str]:
    return sorted(name for name in model.injected_modules("default"))


# (model, target_modules, layers_to_transform, layers_pattern, the stack whose index must be in the list)
CASES = [
    ("gpt2", ["c_attn"], [1], None, "h"),
    ("gpt2", ["c_attn", "c_fc"], [0, 2], "h", "h"),
    ("gpt2", ["c_attn"], [2], ["layers", "h"], "h"),
    ("t5", ["q", "v"], [1], None, "block"),
    ("t5", ["q", "v"], [0, 2], "block", "block"),
    ("t5", ["q", "v"], [1], "layer", "layer"),  # T5's sub-layers: self-attention is 0, cross-attention 1
    ("bert", ["query", "value"], [1], None, "layer"),
    ("bert", ["query", "value"], [0, 2], "layer", "layer"),
    ("falcon", ["query_key_value"], [1], None, "h"),
    ("falcon", ["query_key_value", "dense_4h_to_h"], [2], "h", "h"),
    ("gpt_neox", ["query_key_value"], [1], None, "layers"),
    ("gpt_neox", ["query_key_value"], [0], "layers", "layers"),
    ("unet", ["to_q", "to_k"], [1], "down_blocks", "down_blocks"),
    ("unet", ["to_q", "to_k"], [1], "(down|up)_blocks", "(down|up)_blocks"),
    ("unet", ["to_q"], [1], None, "attentions"),  # HF's default: the first number after two components
    ("custom", ["fc1"], [1], "stages", "stages"),
    ("custom", ["fc1", "fc2"], [0, 2], "blocks", "blocks"),
    ("custom", ["fc1"], [1], None, "stages"),
]


@pytest.mark.parametrize(("kind", "targets", "layers", "pattern", "stack"), CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[2]}" for c in CASES])
def test_only_the_asked_blocks_are_adapted_as_in_hf_peft(kind, targets, layers, pattern, stack) -> None:
    settings = dict(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    model = get_peft_model(build(kind), LoraConfig(**settings))
    found = adapted(model)
    everywhere = adapted(get_peft_model(build(kind), LoraConfig(target_modules=targets)))
    assert 0 < len(found) < len(everywhere)
    blocks = {name: re.search(rf"(?:^|\.){stack}\.(?P<index>\d+)\.", name) for name in everywhere}
    in_asked_blocks = [name for name, block in blocks.items() if block and int(block["index"]) in layers]
    assert found == in_asked_blocks
    assert found == hf_adapted(kind, settings)


def test_a_bare_model_whose_blocks_come_first_defaults_to_them() -> None:
    # HF's default needs a component before the block list and adapts nothing here (an error); ours takes
    # the number after the first component when no module has one further in.
    model = get_peft_model(build("llama_bare"), LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]))
    assert adapted(model) == ["layers.1.self_attn.q_proj"]


def test_an_empty_layers_to_transform_adapts_every_block_as_hf_does() -> None:
    settings = dict(target_modules=["c_attn"], layers_to_transform=[])
    assert adapted(get_peft_model(build("gpt2"), LoraConfig(**settings))) == hf_adapted("gpt2", settings) == [
        f"transformer.h.{i}.attn.c_attn" for i in range(3)
    ]


@pytest.mark.parametrize(("kind", "settings", "message"), [
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[5]),
     r"layers_to_transform \[5\] names no block of GPT2LMHeadModel: its blocks .* are numbered 0 to 2"),
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[1, 3, 7]), r"layers_to_transform \[3, 7\]"),
    ("t5", dict(target_modules=["q"], layers_to_transform=[1], layers_pattern="layers"),
     r"layers_pattern='layers' finds no numbered block in it.*numbered lists here: block, layer\)"),
    ("custom", dict(target_modules=["fc1"], layers_to_transform=[2], layers_pattern="stages"),
     r"\[2\] names no block of Backbone.*numbered 0 to 1.*numbered lists here: blocks, stages\)"),
    ("custom", dict(target_modules=["fc1"], layers_to_transform=[0], layers_pattern="stages["),
     r"layers_pattern 'stages\[' is not a valid regular expression"),
], ids=["beyond-the-blocks", "some-beyond", "no-such-stack", "custom-beyond", "bad-regex"])
def test_layers_that_match_no_block_raise_a_config_error(kind, settings, message) -> None:
    model = build(kind)
    with pytest.raises(ConfigError, match=message):
        get_peft_model(model, LoraConfig(**settings))
    assert not any(isinstance(module, AdapterLayer) for module in model.modules())


def _outputs(kind: str, model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if kind == "t5":
            ids = torch.randint(0, 128, (2, 6), generator=generator)
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        if kind == "unet":
            return model(torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 700]),
                         torch.randn(2, 5, 16, generator=generator)).sample
        return model(torch.randn(3, 8, generator=generator))


@pytest.mark.parametrize(("kind", "settings"), [
    ("t5", dict(target_modules=["q", "v", "wo"], layers_to_transform=[0, 2], layers_pattern="block")),
    ("unet", dict(target_modules=["to_q", "to_v"], layers_to_transform=[1], layers_pattern="(down|up)_blocks")),
    ("custom", dict(target_modules=["fc1", "fc2"], layers_to_transform=[1], layers_pattern="blocks")),
], ids=["t5", "unet", "custom"])
def test_layer_restricted_adapters_load_in_hf_peft_and_back(kind, settings, tmp_path) -> None:
    ours = get_peft_model(build(kind), LoraConfig(r=2, init_lora_weights=False, **settings))
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
        torch.testing.assert_close(_outputs(kind, theirs), _outputs(kind, ours))
        hf = peft.get_peft_model(build(kind), peft.LoraConfig(r=2, init_lora_weights=False, **settings)).eval()
        hf.save_pretrained(tmp_path / "hf")
    loaded = PeftModel.from_pretrained(build(kind), tmp_path / "hf")
    assert adapted(loaded) == adapted(ours)
    torch.testing.assert_close(_outputs(kind, loaded), _outputs(kind, hf))
    assert not torch.allclose(_outputs(kind, loaded), _outputs(kind, build(kind)))
