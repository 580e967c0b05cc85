"""Methods combined on one model: LoRA and IA3 on the same Linear layers."""

from __future__ import annotations

import torch
from peft_core import PeftModel, get_peft_model
from peft_core.testing import tiny_model
from peft_ia3 import IA3Config
from peft_lora import LoraConfig


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def lora_and_ia3(llama):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["k_proj", "v_proj"], init_lora_weights=False), "lora")
    model.add_adapter("ia3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))
    model.set_adapter(["lora", "ia3"])
    return model


def test_lora_then_ia3_on_one_linear_is_the_documented_order(llama):
    model = lora_and_ia3(llama)
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    assert set(k_proj.adapters) == {"lora", "ia3"}
    lora, ia3 = k_proj.adapters["lora"], k_proj.adapters["ia3"]
    x = torch.randn(3, 64)
    with torch.no_grad():  # output adapters in activation order: (W x + s B A x) * l
        expected = (k_proj.base_layer(x) + lora.scaling * x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
        expected = expected * ia3.ia3_l.view(-1)
        torch.testing.assert_close(k_proj(x), expected, atol=1e-6, rtol=1e-5)


def test_both_train_merge_and_round_trip(llama, llama_dir, input_ids, tmp_path):
    model = lora_and_ia3(llama)
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora", "ia3"}
    both = logits(model, input_ids)
    model.set_adapter("lora")
    lora_only = logits(model, input_ids)
    assert (both - lora_only).abs().max() > 1e-3
    model.set_adapter(["lora", "ia3"])

    model.save_pretrained(tmp_path)  # each adapter a normal HF-PEFT-format adapter in its subfolder
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "lora", adapter_name="lora")
    loaded.load_adapter(tmp_path / "ia3", adapter_name="ia3")
    loaded.set_adapter(["lora", "ia3"])
    torch.testing.assert_close(logits(loaded, input_ids), both)

    merged = model.merge_and_unload(adapter_names=["lora", "ia3"])
    torch.testing.assert_close(logits(merged, input_ids), both, atol=1e-5, rtol=1e-5)
