"""IA3: numerics against the formula, exact merging, training, and cross-loading with Hugging Face PEFT."""

from __future__ import annotations

import json

import peft
import pytest
import safetensors.torch
import torch
from peft_core import AdapterLayer, ConfigError, PeftModel, get_peft_model
from peft_core.testing import tiny_model, train_steps
from peft_ia3 import IA3Config
from torch import nn


def logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "logits", out)


def randomize_ia3(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 6, 6) -> (B, 5)
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


CASES = {
    "llama-defaults": ("llama", {}),
    "llama-explicit": ("llama", dict(target_modules=["q_proj", "o_proj", "up_proj"], feedforward_modules=["up_proj"])),
    "gpt2-defaults": ("gpt2", {}),
    "conv": ("conv", {"target_modules": ["conv1", "conv2", "head"], "feedforward_modules": ["conv2", "head"]}),
}


def base_model(kind, tiny_model_dir):
    if kind == "conv":
        torch.manual_seed(0)
        return ConvNet().eval()
    return tiny_model(kind, tiny_model_dir(kind))


def model_inputs(kind):
    generator = torch.Generator().manual_seed(3)
    if kind == "conv":
        return torch.randn(2, 3, 6, 6, generator=generator)
    return {"input_ids": torch.randint(0, 128, (2, 10), generator=generator)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("direction", ["ours-to-hf", "hf-to-ours"])
def test_cross_load_with_hf_peft(case, direction, tiny_model_dir, tmp_path):
    kind, fields = CASES[case]
    inputs = model_inputs(kind)
    base = logits(base_model(kind, tiny_model_dir), inputs)
    if direction == "ours-to-hf":
        source = get_peft_model(base_model(kind, tiny_model_dir), IA3Config(**fields))
    else:
        source = peft.get_peft_model(base_model(kind, tiny_model_dir), peft.IA3Config(**fields))
    randomize_ia3(source)
    expected = logits(source.eval(), inputs)
    assert (expected - base).abs().max() > 1e-3
    source.save_pretrained(tmp_path)
    loader = peft.PeftModel if direction == "ours-to-hf" else PeftModel
    loaded = loader.from_pretrained(base_model(kind, tiny_model_dir), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]


def test_output_and_input_scaling_follow_the_formula(llama):
    model = get_peft_model(llama, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    randomize_ia3(model)
    inner = model.base_model.model.model.layers[0]
    x, h = torch.randn(3, 64), torch.randn(3, 128)
    with torch.no_grad():
        k, down = inner.self_attn.k_proj, inner.mlp.down_proj
        k_scale = k.adapters["default"].ia3_l.view(-1)
        torch.testing.assert_close(k(x), k.base_layer(x) * k_scale)
        down_scale = down.adapters["default"].ia3_l.view(-1)
        torch.testing.assert_close(down(h), down.base_layer(h * down_scale))


@pytest.mark.parametrize("kind", ["gpt2", "conv"])
def test_merge_and_unmerge_are_exact_biases_included(kind, tiny_model_dir):
    fields = CASES["conv"][1] if kind == "conv" else {}
    model = get_peft_model(base_model(kind, tiny_model_dir), IA3Config(**fields))
    randomize_ia3(model)
    inputs = model_inputs(kind)
    adapted = logits(model, inputs)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, before[name], atol=1e-6, rtol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, atol=1e-5, rtol=1e-5)


def test_training_lowers_the_loss_and_changes_only_the_vectors(llama, input_ids, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(llama, IA3Config(task_type="CAUSAL_LM"))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".ia3_l") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, input_ids, 8, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
        else:
            assert not torch.equal(param, trainable[name]), name
    model.save_pretrained(tmp_path)
    keys = set(safetensors.torch.load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {n.replace(".adapters.default", "") for n in trainable}


def test_feedforward_modules_must_be_targets():
    with pytest.raises(ConfigError, match=r"feedforward_modules must be a subset of target_modules; \['fc2'\]"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["fc2"])


def test_default_feedforward_modules_are_among_the_default_targets_of_every_family():
    from peft_ia3.targets import DEFAULT_TARGETS

    for family, (targets, feedforward) in DEFAULT_TARGETS.items():
        assert feedforward and set(feedforward) <= set(targets), family
