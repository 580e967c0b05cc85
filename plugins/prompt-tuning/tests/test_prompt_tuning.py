"""Prompt tuning: initialisation (random, sampled vocabulary, text), training, and config errors."""

from __future__ import annotations

import shutil

import peft
import pytest
import torch
from peft_core import ConfigError, PeftModel, get_peft_model
from peft_core.testing import tiny_model, tiny_tokenizer, train_steps
from peft_prompt_tuning import PromptTuningConfig


def prompt_rows(model, name="default"):
    return model.base_model.model.peft_soft_prompts[name].embedding.weight


def test_text_init_uses_the_embeddings_of_the_text_repeated_to_length(llama, tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    config = PromptTuningConfig(
        num_virtual_tokens=5, task_type="CAUSAL_LM", prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w7 w9", tokenizer_name_or_path=tokenizer,
    )
    word_embeddings = llama.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(llama, config)
    torch.testing.assert_close(prompt_rows(model), word_embeddings[[7, 9, 7, 9, 7]])


def test_text_init_matches_hf(llama_dir, tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    settings = dict(num_virtual_tokens=4, task_type="CAUSAL_LM", prompt_tuning_init="TEXT",
                    prompt_tuning_init_text="w3 w4 w5 w6 w8 w10", tokenizer_name_or_path=tokenizer)
    ours = get_peft_model(tiny_model("llama", llama_dir), PromptTuningConfig(**settings))
    theirs = peft.get_peft_model(tiny_model("llama", llama_dir), peft.PromptTuningConfig(**settings))
    torch.testing.assert_close(prompt_rows(ours), theirs.prompt_encoder["default"].embedding.weight)


def test_a_saved_text_prompt_loads_without_its_tokenizer(llama, llama_dir, tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    model = get_peft_model(llama, PromptTuningConfig(
        num_virtual_tokens=3, task_type="CAUSAL_LM", prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w5", tokenizer_name_or_path=tokenizer,
    ))
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tokenizer)
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "adapter")
    torch.testing.assert_close(prompt_rows(loaded), prompt_rows(model))


def test_sample_vocab_init_takes_rows_of_the_vocabulary(llama):
    vocabulary = llama.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(llama, PromptTuningConfig(
        num_virtual_tokens=6, task_type="CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB",
    ))
    for row in prompt_rows(model):
        assert (vocabulary - row).abs().sum(dim=1).min() == 0


def test_seq2seq_prompts_have_a_block_per_stack(tiny_model_dir):
    model = get_peft_model(
        tiny_model("t5", tiny_model_dir("t5")), PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM")
    )
    assert model.peft_config["default"].num_transformer_submodules == 2
    assert prompt_rows(model).shape == (8, 64)


def test_training_changes_only_the_prompt_and_lowers_the_loss(llama, input_ids):
    model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.peft_soft_prompts.default.embedding.weight"
    ]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, input_ids, steps=10, lr=0.1)
    assert losses[-1] < losses[0] - 0.05
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert changed == ["base_model.model.peft_soft_prompts.default.embedding.weight"]


def test_loss_ignores_the_virtual_positions(llama, input_ids):
    model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids)
        # Every real token is a target, the first one predicted from the last virtual position; no
        # virtual position is a target.
        predicting = out.logits[:, 3:-1].reshape(-1, 128)
        expected = torch.nn.functional.cross_entropy(predicting, input_ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"), "needs a tokenizer: set tokenizer_name_or_path"),
    (dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="x"), "needs prompt_tuning_init_text"),
    (dict(prompt_tuning_init="WORDS"), "prompt_tuning_init='WORDS' is not one of RANDOM, SAMPLE_VOCAB, TEXT"),
    (dict(tokenizer_kwargs={"use_fast": True}), "tokenizer_kwargs only apply"),
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer_name_or_path="x",
          tokenizer_kwargs={"trust_remote_code": True}), "never runs code"),
])
def test_bad_configs_name_the_problem(settings, message):
    with pytest.raises(ConfigError, match=message):
        PromptTuningConfig(num_virtual_tokens=4, **settings)
