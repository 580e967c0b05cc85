"""transformers' Trainer with peft-core models (peft_train.PeftTrainer), and torch.compile on LoRA layers."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.testing import tiny_model
from peft_core.walk import is_checkpointing
from peft_lora import LoraConfig
from peft_p_tuning import PromptEncoderConfig
from peft_train.trainer import TRAINING_STATE_NAME, PeftTrainer
from transformers import TrainingArguments


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(2, 128, (size, 8), generator=generator)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def lora_model(llama_dir, config=None):
    torch.manual_seed(0)
    config = config or LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    return get_peft_model(tiny_model("llama", llama_dir), config)


def arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
        save_strategy="steps", save_steps=3, logging_steps=100, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def adapter_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model._adapter_tensors("default").items()}


def test_checkpoints_hold_only_the_adapter(llama_dir, tmp_path):
    model = lora_model(llama_dir)
    PeftTrainer(model=model, args=arguments(tmp_path), train_dataset=TokenDataset(12, 0)).train()
    checkpoint = tmp_path / "checkpoint-3"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(checkpoint))
    saved = safetensors.torch.load_file(checkpoint / "adapter_model.safetensors")
    assert all(key.startswith("base_model.model.") and "lora_" in key for key in saved)
    final = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "checkpoint-6")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["lora", "p-tuning"])
def test_resuming_from_a_checkpoint_continues_the_same_run(method, llama_dir, tmp_path):
    config = None if method == "lora" else PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    whole = lora_model(llama_dir, config)
    PeftTrainer(model=whole, args=arguments(tmp_path / "whole"), train_dataset=TokenDataset(12, 0)).train()
    if method == "p-tuning":  # the encoder trains but is not in the adapter file: its state is kept beside it
        assert (tmp_path / "whole" / "checkpoint-3" / TRAINING_STATE_NAME).is_file()

    resumed = lora_model(llama_dir, config)
    trainer = PeftTrainer(model=resumed, args=arguments(tmp_path / "resumed"), train_dataset=TokenDataset(12, 0))
    trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    expected, actual = adapter_weights(whole), adapter_weights(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_trains_the_adapter_of_a_frozen_base(llama_dir, tmp_path):
    model = lora_model(llama_dir)
    before = adapter_weights(model)
    trainer = PeftTrainer(model=model, args=arguments(tmp_path, gradient_checkpointing=True, save_strategy="no"),
                          train_dataset=TokenDataset(12, 0))
    trainer.train()
    assert is_checkpointing(model.base_model.model)
    after = adapter_weights(model)
    # Every B factor moved: gradients reached the adapters inside every checkpointed block.
    assert all(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k)


def test_load_best_model_at_end_reloads_the_best_adapter(llama_dir, tmp_path):
    model = lora_model(llama_dir)
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
                     metric_for_best_model="eval_loss", learning_rate=0.2)
    trainer = PeftTrainer(model=model, args=args, train_dataset=TokenDataset(12, 0), eval_dataset=TokenDataset(4, 9))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = safetensors.torch.load_file(os.path.join(best, "adapter_model.safetensors"))
    live = model._adapter_tensors("default")
    for key, tensor in saved.items():
        torch.testing.assert_close(live[key].detach(), tensor)
    if not best.endswith("checkpoint-6"):  # the best was an earlier one: the final weights were replaced
        last = safetensors.torch.load_file(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
        assert any(not torch.equal(last[k], saved[k]) for k in saved)


# --- torch.compile ------------------------------------------------------------------------------------------


def test_compiled_lora_model_matches_eager(llama_dir):
    model = lora_model(llama_dir, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="aot_eager")(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_a_lora_layer_forward_has_no_graph_break(llama_dir):
    model = lora_model(llama_dir, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 5, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_trl_sft_trainer_trains_and_checkpoints_only_the_adapter(llama_dir, tmp_path):
    import datasets
    from peft_core.testing import tiny_tokenizer
    from peft_train.trl import PeftSFTTrainer
    from transformers import AutoTokenizer
    from trl import SFTConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path / "tokenizer"))
    tokenizer.eos_token = "w2"
    model = lora_model(llama_dir)
    texts = [" ".join(f"w{(i * 7 + j) % 120 + 3}" for j in range(8)) for i in range(16)]
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                     learning_rate=5e-2, report_to=[], use_cpu=True, max_length=16, logging_steps=1, bf16=False,
                     disable_tqdm=True)
    trainer = PeftSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    files = set(os.listdir(tmp_path / "run" / "checkpoint-4"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    reloaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "run" / "checkpoint-4")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_a_plain_trainer_trains_and_evaluates_a_peft_model(llama_dir, tmp_path):
    """Without PeftTrainer checkpoints hold the whole model's state dict, but training and evaluation work:
    the wrapper's forward names the usual inputs, so the Trainer keeps the dataset's columns and labels."""
    from transformers import Trainer

    model = lora_model(llama_dir)
    before = adapter_weights(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=TokenDataset(12, 0),
                      eval_dataset=TokenDataset(4, 9))
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < first
    assert all(not torch.equal(v, before[k]) for k, v in adapter_weights(model).items() if "lora_B" in k)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
