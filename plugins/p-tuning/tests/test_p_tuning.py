"""P-tuning: the MLP and LSTM encoders train, are exported as final rows, and continue training from them."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from peft_core import ConfigError, PeftModel, get_peft_model
from peft_core.testing import tiny_model, train_steps
from peft_p_tuning import PromptEncoderConfig

PROMPT = "base_model.model.peft_soft_prompts.default."
ENCODERS = [dict(encoder_hidden_size=16), dict(encoder_reparameterization_type="LSTM", encoder_num_layers=2,
                                               encoder_dropout=0.1)]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("settings", ENCODERS, ids=["mlp", "lstm"])
def test_encoder_trains_and_only_it_changes(settings, llama, input_ids):
    model = get_peft_model(llama, PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM", **settings))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable[0] == PROMPT + "embedding.weight" and len(trainable) > 1
    assert all(n.startswith(PROMPT) for n in trainable)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, input_ids, steps=10)
    assert losses[-1] < losses[0] - 0.05
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed == set(trainable)


@pytest.mark.parametrize("settings", ENCODERS, ids=["mlp", "lstm"])
def test_saved_adapter_is_the_encoder_output_and_needs_no_encoder(settings, llama, llama_dir, input_ids, tmp_path):
    model = get_peft_model(llama, PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM", **settings))
    train_steps(model, input_ids, steps=2)
    prompt = model.base_model.model.peft_soft_prompts["default"]
    with torch.no_grad():
        final_rows = prompt.encoder(prompt.embedding.weight.unsqueeze(0))[0]
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    torch.testing.assert_close(saved["prompt_embeddings"], final_rows)

    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path)
    assert [n for n, _ in loaded.named_parameters() if "peft_soft_prompts" in n] == [PROMPT + "embedding.weight"]
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))


def test_loading_for_training_continues_from_the_saved_rows(llama, llama_dir, input_ids, tmp_path):
    model = get_peft_model(llama, PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    train_steps(model, input_ids, steps=2)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)

    resumed = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path, is_trainable=True)
    assert not resumed.peft_config["default"].inference_mode
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == [PROMPT + "embedding.weight"]
    torch.testing.assert_close(logits(resumed, input_ids), expected)
    losses = train_steps(resumed, input_ids, steps=5)
    assert losses[-1] < losses[0]


def test_mlp_warns_that_encoder_num_layers_does_not_apply():
    with pytest.warns(UserWarning, match="encoder_num_layers only applies to the LSTM"):
        PromptEncoderConfig(num_virtual_tokens=4, encoder_num_layers=3)


def test_hidden_size_defaults_to_the_models(llama):
    model = get_peft_model(llama, PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    assert model.peft_config["default"].encoder_hidden_size == 64


@pytest.mark.parametrize(("settings", "message"), [
    (dict(encoder_reparameterization_type="GRU"), "'GRU' is not one of MLP, LSTM"),
    (dict(encoder_hidden_size=0), "encoder_hidden_size must be positive"),
    (dict(encoder_reparameterization_type="LSTM", encoder_num_layers=0), "encoder_num_layers must be at least 1"),
    (dict(encoder_dropout=1.5), r"encoder_dropout must be in \[0, 1\)"),
])
def test_bad_configs_name_the_problem(settings, message):
    with pytest.raises(ConfigError, match=message):
        PromptEncoderConfig(num_virtual_tokens=4, **settings)


def test_peft_inspect_shows_the_encoder_width(llama, tmp_path):
    from peft_core.cli.inspect import describe
    from peft_core.model import get_peft_model
    from peft_p_tuning import PromptEncoderConfig

    model = get_peft_model(llama, PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=24,
                                                       task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    info = describe(str(tmp_path))
    assert info["encoder_hidden_size"] == 24 and info["num_virtual_tokens"] == 3
