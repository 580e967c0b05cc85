"""QLoRA on the CPU with bitsandbytes: quantization, training, merging, and plain LoRA adapters on disk."""

from __future__ import annotations

import json
import sys

import bitsandbytes as bnb
import peft
import pytest
import torch
from peft_core import ConfigError, PeftModel, PluginError, get_peft_model
from peft_core.testing import tiny_model, train_steps
from peft_core.weights import read_weight
from peft_lora import LoraConfig
from peft_qlora import QLoraConfig, dequantize_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

QUANTIZED = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def weight_bytes(layer) -> int:
    """Bytes of a quantized Linear's weight and everything needed to dequantize it."""
    weight = layer.weight
    total = weight.data.numel() * weight.data.element_size()
    if isinstance(layer, bnb.nn.Linear4bit):
        state = weight.quant_state.as_dict(packed=True)
        return total + sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB
    return total + scales.numel() * scales.element_size()


def quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED)}


def bnb_4bit(llama_dir):
    """The tiny Llama as transformers loads it with BitsAndBytesConfig (deterministic: same weights each time)."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config).eval()


def train(model, input_ids, lr=1e-2):
    return train_steps(model, input_ids, 6, lr=lr)


@pytest.mark.parametrize(("quantized_by", "bits", "max_ratio"), [
    ("peft_qlora", 4, 0.3), ("peft_qlora", 8, 0.55), ("transformers", 4, 0.3),
])
def test_quantized_linear_weights_take_at_most_a_fraction_of_float16(tmp_path, quantized_by, bits, max_ratio):
    # Layers of a realistic width: bitsandbytes keeps ~1 KiB of lookup tables per 4-bit layer, which
    # would dominate the 64-wide layers of the other tests.
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=128)).save_pretrained(tmp_path)
    base = bnb_4bit(tmp_path) if quantized_by == "transformers" else AutoModelForCausalLM.from_pretrained(tmp_path)
    model = get_peft_model(base, QLoraConfig(bits=bits, r=4, target_modules=["q_proj", "v_proj"]))
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7 and not any("lm_head" in name for name in layers)
    assert type(model.base_model.model.lm_head) is torch.nn.Linear
    quantized = sum(weight_bytes(m) for m in layers.values())
    float16 = sum(m.in_features * m.out_features * 2 for m in layers.values())
    assert quantized <= max_ratio * float16


def test_skip_modules_stay_in_full_precision(llama):
    model = get_peft_model(llama, QLoraConfig(r=4, target_modules=["q_proj"], skip_modules=["down_proj"]))
    assert type(model.base_model.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)


def test_a_model_transformers_quantized_is_not_quantized_again(llama_dir):
    base = bnb_4bit(llama_dir)
    before = {name: id(m) for name, m in quantized_layers(base).items()}
    get_peft_model(base, QLoraConfig(r=4, target_modules=["q_proj"]))
    after = {name.replace(".base_layer", ""): id(m) for name, m in quantized_layers(base).items()}
    assert after == before
    with pytest.raises(ConfigError, match=r"already quantized to \[4\] bits but the config asks for 8"):
        get_peft_model(bnb_4bit(llama_dir), QLoraConfig(bits=8, target_modules=["q_proj"]))


@pytest.mark.parametrize("quantized_by", ["peft_qlora-4bit", "peft_qlora-8bit", "transformers-4bit"])
def test_training_lowers_the_loss_and_leaves_quantized_weights_alone(llama_dir, input_ids, quantized_by):
    torch.manual_seed(0)
    base = bnb_4bit(llama_dir) if quantized_by == "transformers-4bit" else tiny_model("llama", llama_dir)
    bits = 8 if quantized_by.endswith("8bit") else 4
    model = get_peft_model(base, QLoraConfig(bits=bits, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS))
    before = {name: read_weight(m) for name, m in quantized_layers(model).items()}
    assert len(before) == 2 * 7
    losses = train(model, input_ids)
    assert losses[-1] < losses[0] - 0.1
    for name, layer in quantized_layers(model).items():
        assert torch.equal(read_weight(layer), before[name]), name
    assert all(".adapters.default.lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_quantization_is_a_hook_so_other_methods_compose_on_the_quantized_base(llama, input_ids):
    """A method the QLoRA plugin knows nothing about (the core tests' 'scale') on the same 4-bit layers."""
    import scale_method
    from peft_core.plugins import registry
    from scale_method import ScaleConfig

    if "scale" not in registry().methods:
        registry().register(scale_method, name="scale-method-for-tests")
    model = get_peft_model(llama, QLoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    lora_only = logits(model, input_ids)
    model.add_adapter("scale", ScaleConfig(target_modules=["o_proj"], init_value=1.5))
    model.set_adapter(["default", "scale"])
    both = logits(model, input_ids)
    assert (both - lora_only).abs().max() > 1e-3
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and set(layer.adapters) == {"default", "scale"}
    x = torch.randn(3, 64)
    with torch.no_grad():  # LoRA adds, then the scale multiplies: the wrapper's documented order
        base = layer.base_layer(x)
        expected = layer.adapters["scale"](x, layer.adapters["default"](x, base))
        torch.testing.assert_close(layer(x), expected)


def test_merging_on_a_4bit_base(llama, llama_dir, input_ids):
    full_precision = logits(llama, input_ids)
    model = get_peft_model(llama, QLoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS))
    with model.disable_adapter():
        quantization_error = (logits(model, input_ids) - full_precision).abs().max()
    train(model, input_ids, lr=1e-3)
    unmerged = logits(model, input_ids)
    dequantized = {name: read_weight(m) for name, m in quantized_layers(model).items()}

    model.merge_adapter()  # re-quantizes the merged weights: equal up to 4-bit rounding
    merged = logits(model, input_ids)
    # Re-quantizing W + BA errs about as much as quantizing W did in the first place.
    assert 0 < (merged - unmerged).abs().max() <= 2 * quantization_error
    model.unmerge_adapter()  # exact: the quantized weights from before the merge come back
    for name, layer in quantized_layers(model).items():
        assert torch.equal(read_weight(layer), dequantized[name]), name
    torch.testing.assert_close(logits(model, input_ids), unmerged)

    requantized = model.merge_and_unload()
    assert isinstance(requantized.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_dequantize_then_merge_gives_a_full_precision_model(llama, input_ids):
    model = get_peft_model(llama, QLoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS))
    train(model, input_ids)
    quantized = logits(model, input_ids)
    unmerged = logits(dequantize_model(model), input_ids)
    # bitsandbytes' CPU inference kernel for 4-bit computes in bfloat16 on CPUs that have it
    torch.testing.assert_close(unmerged, quantized, atol=1e-2, rtol=1e-2)
    merged = model.merge_and_unload()
    assert not quantized_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(merged, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_saved_adapter_is_plain_lora_that_loads_anywhere(llama, llama_dir, input_ids, tmp_path):
    model = get_peft_model(llama, QLoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS))
    train(model, input_ids)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not set(QLoraConfig.QUANTIZATION_FIELDS) & set(config)

    # on a base quantized the same way: the same outputs
    quantized_base = get_peft_model(tiny_model("llama", llama_dir), QLoraConfig(target_modules=["q_proj"])).unload()
    reloaded = PeftModel.from_pretrained(quantized_base, tmp_path)
    assert isinstance(reloaded.peft_config["default"], LoraConfig)
    torch.testing.assert_close(logits(reloaded, input_ids), expected)

    # on a full-precision base, in both libraries: the same outputs as each other
    ours = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path)
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", ["hf-to-ours", "ours-to-hf"])
def test_cross_load_with_hf_peft_on_a_4bit_base(llama_dir, input_ids, tmp_path, direction):
    lora = dict(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS, init_lora_weights=False)
    if direction == "hf-to-ours":
        source = peft.get_peft_model(bnb_4bit(llama_dir), peft.LoraConfig(**lora)).eval()
    else:
        source = get_peft_model(bnb_4bit(llama_dir), LoraConfig(**lora)).eval()
    expected = logits(source, input_ids)
    assert (expected - logits(bnb_4bit(llama_dir), input_ids)).abs().max() > 1e-2
    source.save_pretrained(tmp_path)
    loader = PeftModel if direction == "hf-to-ours" else peft.PeftModel
    loaded = loader.from_pretrained(bnb_4bit(llama_dir), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_prepare_model_for_kbit_training(llama_dir, input_ids):
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    quantized = get_peft_model(base, QLoraConfig(r=4, target_modules=["q_proj"], compute_dtype="float32")).unload()
    packed = {name: m.weight.data.clone() for name, m in quantized_layers(quantized).items()}
    prepare_model_for_kbit_training(quantized)
    assert quantized.model.norm.weight.dtype == torch.float32
    assert quantized.model.embed_tokens.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in quantized.parameters())
    for name, layer in quantized_layers(quantized).items():
        assert torch.equal(layer.weight.data, packed[name])
    model = get_peft_model(quantized, QLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)  # checkpointed blocks still reach the adapters


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 3}, "bits must be 4 or 8"),
    ({"quant_type": "int4"}, "quant_type must be 'nf4' or 'fp4'"),
    ({"compute_dtype": "float64"}, "compute_dtype must be one of"),
])
def test_invalid_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QLoraConfig(**kwargs)


def test_missing_or_old_bitsandbytes_says_what_to_install(llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(PluginError, match=r"pip install 'bitsandbytes>=0\.45\.0'"):
        get_peft_model(llama, QLoraConfig(target_modules=["q_proj"]))
    monkeypatch.undo()
    monkeypatch.setattr(bnb, "__version__", "0.40.1")
    with pytest.raises(PluginError, match=r"needs bitsandbytes >= 0\.45\.0, found 0\.40\.1: pip install --upgrade"):
        get_peft_model(llama, QLoraConfig(target_modules=["q_proj"]))
