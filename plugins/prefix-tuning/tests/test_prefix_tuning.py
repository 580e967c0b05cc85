"""Prefix tuning: prefixes reach every attention layer's cache in the right shape, train, and export."""

from __future__ import annotations

import warnings

import pytest
import safetensors.torch
import torch
from peft_core import ConfigError, PeftModel, get_peft_model
from peft_core.testing import tiny_model, train_steps
from peft_prefix_tuning import PrefixTuningConfig

PROMPT = "base_model.model.peft_soft_prompts.default."


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_prefix_fills_each_layers_cache_with_its_own_rows(llama):
    """Tiny Llama: 2 layers, 4 query heads sharing 2 key/value heads of width 16."""
    model = get_peft_model(llama, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")).eval()
    config = model.peft_config["default"]
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (2, 2, 32)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).cache
    rows = model.base_model.model.peft_soft_prompts["default"]().detach()  # (3, layers * 2 * 32)
    for layer in range(2):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        assert keys.shape == (1, 2, 3 + 4, 16)
        block = rows.view(3, 2, 2, 2, 16)[:, layer]  # (token, key|value, head, head_dim)
        torch.testing.assert_close(keys[0, :, :3], block[:, 0].permute(1, 0, 2))
        torch.testing.assert_close(values[0, :, :3], block[:, 1].permute(1, 0, 2))


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_training_changes_only_the_prefix_and_lowers_the_loss(projection, llama, input_ids):
    model = get_peft_model(llama, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM",
                                                     prefix_projection=projection, encoder_hidden_size=24))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(PROMPT) for n in trainable) and len(trainable) == (5 if projection else 1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, input_ids, steps=10, lr=0.05)
    assert losses[-1] < losses[0] - 0.05
    assert {n for n, p in model.named_parameters() if not torch.equal(p, start[n])} == trainable


def test_projection_is_saved_as_its_output(llama, llama_dir, input_ids, tmp_path):
    model = get_peft_model(llama, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM",
                                                     prefix_projection=True))
    train_steps(model, input_ids, steps=2)
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(saved["prompt_embeddings"], model.base_model.model.peft_soft_prompts["default"]())
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path)
    assert [n for n, _ in loaded.named_parameters() if "peft_soft_prompts" in n] == [PROMPT + "embedding.weight"]
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))


def test_gpt2_without_grouped_query_attention_uses_the_hidden_size(gpt2):
    model = get_peft_model(gpt2, PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    config = model.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (64, 4, 2)


def test_bfloat16_model_gets_prefixes_in_its_dtype(llama_dir, input_ids):
    model = get_peft_model(tiny_model("llama", llama_dir, dtype=torch.bfloat16),
                           PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    assert model.base_model.model.peft_soft_prompts["default"].embedding.weight.dtype == torch.float32
    losses = train_steps(model, input_ids, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_token_dim_that_does_not_split_into_heads_is_refused(llama):
    with pytest.raises(ConfigError, match="does not split into num_attention_heads=5"):
        get_peft_model(llama, PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=5))


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_prefixes_use_transformers_cache_api_without_deprecation_warnings(kind, tmp_path):
    """transformers 5.25 deprecates the ``past_key_values`` argument (removed in 5.40) with a FutureWarning and
    logs its ``cache`` rename once: the prefix is handed over as ``cache``, in training and generation,
    cached or not, alone or in a mixed batch."""
    import logging

    from transformers.utils import logging as transformers_logging

    task = "SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM"
    model = get_peft_model(tiny_model(kind), PrefixTuningConfig(num_virtual_tokens=3, task_type=task))
    input_ids = torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    transformers_logger = transformers_logging.get_logger("transformers")
    transformers_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # say it again if an earlier test already had it said
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            train_steps(model, {"input_ids": input_ids, "labels": input_ids}, steps=1)
            settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
            cached = model.generate(input_ids=input_ids, **settings)
            uncached = model.generate(input_ids=input_ids, use_cache=False, **settings)
            if kind == "llama":  # mixed batches are for decoder-only models
                model.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=2, task_type=task))
                model.generate(input_ids=input_ids, adapter_names=["default", "other"], **settings)
    finally:
        transformers_logger.removeHandler(handler)
    assert torch.equal(cached, uncached)
    assert not [message for message in logged if "past_key_values" in message]
