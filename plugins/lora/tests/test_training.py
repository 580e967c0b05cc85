"""LoRA on real (tiny) transformers models: training, merging, biases, several adapters."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from peft_core import AdapterLayer, PeftModel, get_peft_model
from peft_core.testing import tiny_model, train_steps
from peft_lora import LoraConfig


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def base_weights(model):
    """Every non-adapter tensor, by its name in the unwrapped model."""
    return {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in model.named_parameters() if ".adapters." not in name
    }


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_lowers_the_loss_and_changes_only_adapters(kind, tiny_model_dir, input_ids):
    torch.manual_seed(0)
    model = tiny_model(kind, tiny_model_dir(kind))
    before = base_weights(model)
    targets = "all-linear" if kind == "llama" else ["c_attn", "c_proj", "c_fc"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    adapters_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapters_before and all(".adapters.default.lora_" in n for n in adapters_before)

    losses = train_steps(peft_model, input_ids, 8)
    assert losses[-1] < losses[0] - 0.1

    after = base_weights(peft_model.get_base_model())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"base weight {name} changed"
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(not torch.equal(p, adapters_before[n]) for n, p in trained.items())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_and_unload(kind, tiny_model_dir, input_ids):
    model = tiny_model(kind, tiny_model_dir(kind))
    base = logits(model, input_ids)
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_fc"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    adapted = logits(peft_model, input_ids)
    assert (adapted - base).abs().max() > 1e-3

    merged = peft_model.merge_and_unload()
    assert type(merged) is type(model)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-5, rtol=1e-5)

    fresh = tiny_model(kind, tiny_model_dir(kind))
    unloaded = get_peft_model(fresh, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).unload()
    assert not any(isinstance(m, AdapterLayer) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded, input_ids), base)


@pytest.mark.parametrize(("bias", "expected"), [
    ("none", set()),
    ("lora_only", {"base_model.model.transformer.h.0.attn.c_attn.base_layer.bias",
                   "base_model.model.transformer.h.1.attn.c_attn.base_layer.bias"}),
])
def test_bias_options_decide_which_biases_train_and_are_saved(gpt2, tmp_path, bias, expected):
    model = get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable_biases == expected
    model.save_pretrained(tmp_path)
    saved = set(safetensors.torch.load_file(tmp_path / "adapter_model.safetensors"))
    assert {k for k in saved if k.endswith("bias")} == expected


def test_bias_all_trains_and_saves_every_bias(gpt2, tiny_model_dir, tmp_path, input_ids):
    model = get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    biases = {n for n, p in model.named_parameters() if n.endswith("bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")} == biases
    with torch.no_grad():
        model.base_model.model.transformer.h[1].mlp.c_fc.bias.add_(0.5)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("gpt2", tiny_model_dir("gpt2")), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), expected)


def test_two_lora_adapters_on_the_same_layers(llama, input_ids):
    model = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "one")
    model.add_adapter("two", LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    one = logits(model, input_ids)
    model.set_adapter("two")
    two = logits(model, input_ids)
    model.set_adapter(["one", "two"])
    both = logits(model, input_ids)
    with model.disable_adapter():
        base = logits(model, input_ids)
    # Two active LoRA adapters add their updates in the layer.
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        base_out = layer.base_layer(x)
        sum_of_deltas = sum(layer.adapters[n](x, base_out) - base_out for n in ("one", "two"))
        torch.testing.assert_close(layer(x), base_out + sum_of_deltas, atol=1e-5, rtol=1e-5)
    outputs = [one, two, both, base]
    for i, first in enumerate(outputs):
        for second in outputs[i + 1 :]:
            assert not torch.allclose(first, second, atol=1e-4)
    model.merge_adapter(["one", "two"])
    torch.testing.assert_close(logits(model, input_ids), both, atol=1e-5, rtol=1e-5)
