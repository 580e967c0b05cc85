"""accelerate: a training loop through Accelerator.prepare, and adapters on an offloaded model."""

from __future__ import annotations

import safetensors.torch
import torch
from accelerate import Accelerator, cpu_offload
from peft_core import PeftModel, get_peft_model
from peft_core.testing import tiny_model
from peft_lora import LoraConfig

CONFIG = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def test_a_prepared_training_loop_trains_the_adapter(llama_dir):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", llama_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rows = torch.randint(2, 128, (8, 8), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    accelerator = Accelerator(cpu=True)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(3):
        for batch in loader:
            loss = prepared(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert isinstance(accelerator.unwrap_model(prepared), type(model))


def test_adapters_on_an_offloaded_model_keep_its_hooks_and_merge(llama_dir):
    reference = get_peft_model(tiny_model("llama", llama_dir), LoraConfig(**CONFIG)).eval()
    offloaded = tiny_model("llama", llama_dir)
    cpu_offload(offloaded, execution_device="cpu")  # weights on meta, moved in by a hook at each call
    model = get_peft_model(offloaded, LoraConfig(**CONFIG)).eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.is_meta and hasattr(q_proj.base_layer, "_hf_hook")
    assert q_proj.adapters["default"].lora_A.weight.device.type == "cpu"  # the hook's execution device
    with torch.no_grad():  # the same adapter weights in both, then the same outputs
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(dict(reference.named_parameters())[name])
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        expected = reference(input_ids=ids).logits
        base_logits = tiny_model("llama", llama_dir)(input_ids=ids).logits
        model.merge_adapter()  # into the offload store: the weights come in, change, and go back out
        assert q_proj.merged_adapters == ["default"] and q_proj.base_layer.weight.is_meta
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base_logits, atol=1e-5, rtol=1e-4)
        merged = model.merge_and_unload()
        layer = merged.model.layers[0].self_attn.q_proj
        assert type(layer) is torch.nn.Linear and hasattr(layer, "_hf_hook") and layer.weight.is_meta
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_save_pretrained_takes_transformers_saving_arguments(llama_dir, tmp_path):
    model = get_peft_model(tiny_model("llama", llama_dir), LoraConfig(**CONFIG))
    model.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()
    # A state dict (as gathered from FSDP shards) supplies the values, under the model's parameter names.
    gathered = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters() if "lora_" in n}
    model.save_pretrained(tmp_path / "gathered", state_dict=gathered)
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "gathered")
    assert all(torch.all(p == 0.5) for n, p in loaded.named_parameters() if "lora_" in n)


def test_saved_keys_leave_out_the_modules_wrappers_insert(llama_dir, tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = get_peft_model(tiny_model("llama", llama_dir), LoraConfig(**CONFIG))
    model.save_pretrained(tmp_path / "plain")
    apply_activation_checkpointing(  # inserts _checkpoint_wrapped_module into every layer's path
        model, check_fn=lambda m: type(m).__name__ == "LlamaDecoderLayer")
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path / "wrapped")
    plain = safetensors.torch.load_file(tmp_path / "plain" / "adapter_model.safetensors")
    wrapped = safetensors.torch.load_file(tmp_path / "wrapped" / "adapter_model.safetensors")
    assert wrapped.keys() == plain.keys()
