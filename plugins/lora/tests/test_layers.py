"""LoRA layer numerics against the formulas, and exact merge/unmerge, for every layer kind."""

from __future__ import annotations

import math

import pytest
import torch
from peft_core import ConfigError, get_peft_model
from peft_lora import LoraConfig
from torch import nn
from transformers.pytorch_utils import Conv1D


class Block(nn.Module):
    """One of each layer kind LoRA adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.lin = nn.Linear(8, 6)
        self.c1d = Conv1D(6, 8)  # GPT-2 style: weight stored (in=8, out=6)
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(8)


def randomize(model, seed=0):
    """Give every trainable (adapter) tensor random values, so the update is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if param.dim() == 1 else 0))


def lora(model, use_dora=False, **kwargs):
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["emb", "lin", "c1d", "conv"], use_dora=use_dora, **kwargs)
    if use_dora:
        config.exclude_modules = ["emb"]
    peft_model = get_peft_model(model, config)
    randomize(peft_model)
    return peft_model


def adapter(model, name):
    return model.base_model.model.get_submodule(name).adapters["default"]


@pytest.fixture
def block():
    torch.manual_seed(0)
    return Block().eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(2)
    return {
        "emb": torch.randint(0, 20, (2, 5), generator=g), "lin": torch.randn(2, 5, 8, generator=g),
        "c1d": torch.randn(2, 5, 8, generator=g), "conv": torch.randn(2, 3, 7, 7, generator=g),
    }


def run(model, name, x):
    with torch.no_grad():
        return model.get_submodule(name)(x)


def test_linear_and_conv1d_add_the_scaled_low_rank_product(block, inputs):
    model = lora(block)
    inner = model.base_model.model
    for name in ("lin", "c1d"):
        a = adapter(model, name)
        x = inputs[name]
        base = inner.get_submodule(name).base_layer(x)
        expected = base + (x @ a.lora_A.weight.T @ a.lora_B.weight.T) * (6 / 2)
        torch.testing.assert_close(run(inner, name, x), expected)


def test_embedding_looks_up_the_low_rank_table(block, inputs):
    model = lora(block)
    a, x = adapter(model, "emb"), inputs["emb"]
    layer = model.base_model.model.emb
    expected = layer.base_layer(x) + (a.lora_embedding_A.T[x] @ a.lora_embedding_B.T) * 3
    torch.testing.assert_close(run(model.base_model.model, "emb", x), expected)


def test_conv2d_adds_a_low_rank_convolution(block, inputs):
    model = lora(block)
    a, x = adapter(model, "conv"), inputs["conv"]
    layer = model.base_model.model.conv
    delta = torch.einsum("or,rihw->oihw", a.lora_B.weight[:, :, 0, 0], a.lora_A.weight) * 3
    expected = nn.functional.conv2d(x, layer.base_layer.weight + delta, layer.base_layer.bias, padding=1)
    torch.testing.assert_close(run(model.base_model.model, "conv", x), expected, atol=1e-5, rtol=1e-5)


def test_dora_rescales_rows_of_the_adapted_weight(block, inputs):
    model = lora(block, use_dora=True)
    inner = model.base_model.model
    a, x = adapter(model, "lin"), inputs["lin"]
    weight = inner.lin.base_layer.weight + a.lora_B.weight @ a.lora_A.weight * 3
    expected = nn.functional.linear(x, a.lora_magnitude_vector[:, None] * weight / weight.norm(dim=1, keepdim=True),
                                    inner.lin.base_layer.bias)
    torch.testing.assert_close(run(inner, "lin", x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unmerge_are_exact(block, inputs, use_dora):
    original = {n: p.clone() for n, p in block.state_dict().items()}
    model = lora(block, use_dora=use_dora)
    inner = model.base_model.model
    names = ["lin", "c1d", "conv"] + ([] if use_dora else ["emb"])
    adapted = {n: run(inner, n, inputs[n]) for n in names}
    model.merge_adapter()
    for n in names:
        torch.testing.assert_close(run(inner, n, inputs[n]), adapted[n], atol=1e-5, rtol=1e-5)
        assert not inner.get_submodule(n)._output_adapters  # merged: the adapter no longer runs
    model.unmerge_adapter()
    restored = model.unload().state_dict()
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=1e-6)


def test_scaling_variants():
    lin = nn.Sequential(nn.Linear(8, 8))
    model = get_peft_model(lin, LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["0"],
                                           rank_pattern={"0": 2}, alpha_pattern={"0": 3}))
    a = model.base_model.model[0].adapters["default"]
    assert a.lora_A.weight.shape == (2, 8) and a.scaling == pytest.approx(3 / math.sqrt(2))


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_initialisation_choices(init):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 64))
    model = get_peft_model(lin, LoraConfig(r=16, target_modules=["0"], init_lora_weights=init))
    a = model.base_model.model[0].adapters["default"]
    assert bool(a.lora_B.weight.abs().sum() == 0) is (init is not False)
    if init == "gaussian":
        assert a.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.15)


# The randomized SVD of pissa_niter_<n> only approximates the top singular values.
@pytest.mark.parametrize(("init", "tolerance"), [("pissa", 1e-3), ("pissa_niter_4", 0.1)])
def test_pissa_keeps_the_function_and_moves_the_principal_part(init, tolerance):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(32, 24))
    x = torch.randn(5, 32)
    expected = lin(x).detach()
    weight = lin[0].weight.detach().clone()
    model = get_peft_model(lin, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=init))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
    a = model.base_model.model[0].adapters["default"]
    top = torch.linalg.svdvals(weight)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(a.delta_weight())[:4], top, atol=tolerance, rtol=tolerance)


def test_unsupported_layer_is_a_clear_error(block):
    message = r"cannot adapt 'norm', a LayerNorm; it adapts Conv1D, Conv2d, Embedding, Linear"
    with pytest.raises(ConfigError, match=message):
        get_peft_model(block, LoraConfig(target_modules=["lin", "norm"]))
    assert type(block.lin) is nn.Linear  # nothing was injected


def test_dora_on_an_embedding_is_refused(block):
    with pytest.raises(ConfigError, match="use_dora is supported on Linear.*not on the embedding 'emb'"):
        get_peft_model(block, LoraConfig(target_modules=["emb"], use_dora=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, r"LoraConfig.r must be int, not float \(2.5\)"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora' is not supported"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ],
)
def test_invalid_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_default_targets_name_modules_for_every_family():
    from peft_lora.targets import DEFAULT_TARGETS

    for family, module_names in DEFAULT_TARGETS.items():
        assert module_names and all(isinstance(n, str) for n in module_names), family
