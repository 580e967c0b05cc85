"""PeftModel behaviour, exercised with the test-only 'scale' method: the core needs no real plugin."""

from __future__ import annotations

import time

import pytest
import torch
from peft_core import AdapterLayer, ModulesToSave, PeftError, get_peft_model
from peft_core.model import PeftModelForCausalLM
from scale_method import ScaleConfig


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def scaled_copy(llama, factor, target="o_proj"):
    """The base model with the target weights multiplied by hand: what the adapter must compute."""
    expected = type(llama)(llama.config).eval()
    expected.load_state_dict(llama.state_dict())
    with torch.no_grad():
        for name, module in expected.named_modules():
            if name.endswith(target):
                module.weight.mul_(factor)
    return expected


def test_adapter_forward_equals_the_hand_computed_model(llama, input_ids):
    expected = logits(scaled_copy(llama, 1.5), input_ids)
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj"], init_value=1.5, task_type="CAUSAL_LM"))
    assert isinstance(model, PeftModelForCausalLM)
    torch.testing.assert_close(logits(model, input_ids), expected)


def test_only_adapter_parameters_train(llama):
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj"]))
    assert not any(m.training for m in model.modules())  # new modules follow the eval-mode model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.model.layers.{i}.self_attn.o_proj.adapters.default.scale" for i in (0, 1)}
    assert model.get_nb_trainable_parameters() == (128, sum(p.numel() for p in model.parameters()))


def test_print_trainable_parameters(llama, capsys):
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj"]))
    model.print_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out == (
        f"trainable params: 128 || all params: {total:,d} || trainable%: {100 * 128 / total:.4f}\n"
    )


def test_disable_merge_unload(llama, input_ids):
    base = logits(llama, input_ids)
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj", "up_proj"], init_value=0.7))
    adapted = logits(model, input_ids)
    assert not torch.allclose(adapted, base)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base)
    torch.testing.assert_close(logits(model, input_ids), adapted)

    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), adapted)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, input_ids), adapted)

    restored = model.unload()
    assert restored is llama
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in restored.modules())
    torch.testing.assert_close(logits(restored, input_ids), base)


def test_merge_and_unload_returns_the_plain_model(llama, input_ids):
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj"], init_value=1.3, modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(0.5)
    adapted = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert type(merged.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    assert type(merged.lm_head) is torch.nn.Linear
    torch.testing.assert_close(logits(merged, input_ids), adapted)


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing(llama, input_ids):
    before = {n: p.clone() for n, p in llama.named_parameters()}
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj"], init_value=1.1))
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.o_proj.adapters["default"].scale[3] = float("inf")
    with pytest.raises(PeftError, match=r"layers\.1\.self_attn\.o_proj gives NaN or Inf"):
        model.merge_adapter(safe_merge=True)
    for name, value in before.items():
        module, _, attribute = name.rpartition(".")
        assert torch.equal(getattr(llama.get_submodule(module), attribute), value), name


def test_several_adapters_switch_and_delete(llama, input_ids):
    base = logits(llama, input_ids)
    expected_a = logits(scaled_copy(llama, 2.0), input_ids)
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj"], init_value=2.0), adapter_name="a")
    model.add_adapter("b", ScaleConfig(target_modules=["o_proj", "down_proj"], init_value=0.5))
    assert model.active_adapters == ["a"]
    out_a = logits(model, input_ids)
    model.set_adapter("b")
    out_b = logits(model, input_ids)
    torch.testing.assert_close(out_a, expected_a)
    assert not torch.allclose(out_a, out_b)
    # only the active adapter trains
    assert {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"b"}
    model.set_adapter(["a", "b"])
    assert not torch.allclose(logits(model, input_ids), out_b)
    with pytest.raises(PeftError, match="No adapter named 'c'"):
        model.set_adapter("c")

    model.delete_adapter("b")
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert type(down) is torch.nn.Linear  # no adapter left there: the base layer is back
    model.set_adapter("a")
    torch.testing.assert_close(logits(model, input_ids), out_a)
    model.delete_adapter("a")
    torch.testing.assert_close(logits(model, input_ids), base)


def test_attribute_passthrough_and_generate(llama, input_ids):
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj"]))  # scale 1: the identity
    assert model.config is llama.config
    assert model.get_base_model() is llama and model.base_model.model is llama
    assert model.model is llama  # as in Hugging Face PEFT: through base_model to the wrapped model
    assert model.get_base_model().model.layers[0].self_attn.o_proj.in_features == 64  # through the layer wrapper
    expected = llama.generate(input_ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(model.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False), expected)


def test_injection_on_meta_device_allocates_nothing():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    start = time.perf_counter()
    peft_model = get_peft_model(model, ScaleConfig(target_modules="all-linear"))
    assert time.perf_counter() - start < 5
    adapters = [p for n, p in peft_model.named_parameters() if ".adapters." in n]
    assert len(adapters) == 32 * 7 and all(p.is_meta for p in adapters)


def test_accelerate_offloaded_model_gets_adapters_on_the_execution_device(llama, llama_dir, input_ids):
    from accelerate import cpu_offload
    from peft_core.testing import tiny_model

    expected = logits(get_peft_model(llama, ScaleConfig(target_modules=["o_proj"], init_value=1.5)), input_ids)
    offloaded = tiny_model("llama", llama_dir)
    cpu_offload(offloaded, execution_device="cpu")
    assert offloaded.model.layers[0].self_attn.o_proj.weight.is_meta
    model = get_peft_model(offloaded, ScaleConfig(target_modules=["o_proj"], init_value=1.5))
    scale = model.base_model.model.model.layers[0].self_attn.o_proj.adapters["default"].scale
    assert scale.device.type == "cpu"
    torch.testing.assert_close(logits(model, input_ids), expected)


def test_gradient_checkpointing_still_trains_adapters(llama, input_ids):
    if hasattr(llama, "activation_checkpointing_enable"):  # transformers >= 5
        llama.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    llama.train()
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj"]))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    grad = model.base_model.model.model.layers[0].self_attn.o_proj.adapters["default"].scale.grad
    assert grad is not None and grad.abs().sum() > 0
