"""An adapter file may replace only the base-model tensors its config declares, and deleting or unloading the
adapter gives them back bit for bit: a multi-adapter model is never left changed by an adapter that is gone."""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft_core import AdapterLayer, AdapterLoadError, ConfigError, PeftError, PeftModel, ServingModel, get_peft_model
from peft_core.cli.inspect import describe
from peft_core.testing import strip_checksums, tiny_model
from peft_lora import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89]])
WEIGHTS = "adapter_model.safetensors"
ATTENTION = {"llama": "q_proj", "gpt2": "c_attn"}


@pytest.fixture
def make(tmp_path_factory):
    """``make(kind)``: a fresh tiny base model, the same every call."""
    root = tmp_path_factory.mktemp("bases")
    return lambda kind: tiny_model(kind, root / kind)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, changed


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def hf_adapter(base: nn.Module, directory: Path, seed: int = 1, **settings) -> nn.Module:
    """A Hugging Face PEFT LoRA with every trainable tensor (biases included) moved away from its start."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's notes about saving embeddings
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, init_lora_weights=False, **settings))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(directory)
    return model.eval()


def edit_weights(directory: Path, edit) -> None:
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


# --- undeclared base tensors are refused --------------------------------------------------------------------

UNDECLARED = [
    ("llama", "base_model.model.model.norm.weight", False),
    ("llama", "base_model.model.model.embed_tokens.weight", True),
    ("llama", "base_model.model.lm_head.weight", True),
    ("llama", "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", False),  # its own layer's weight
    ("llama", "base_model.model.model.layers.1.mlp.down_proj.weight", False),
    ("gpt2", "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias", False),  # a bias, with bias="none"
    ("gpt2", "base_model.model.transformer.h.1.ln_2.bias", False),
]


@pytest.mark.parametrize(("kind", "key", "is_embedding"), UNDECLARED,
                         ids=[key.split("model.", 2)[-1] for _, key, _ in UNDECLARED])
def test_a_plain_adapter_cannot_replace_an_undeclared_base_tensor(make, tmp_path, kind, key, is_embedding):
    get_peft_model(make(kind), LoraConfig(r=4, target_modules=[ATTENTION[kind]])).save_pretrained(tmp_path)
    live = dict(get_peft_model(make(kind), LoraConfig(r=4, target_modules=[ATTENTION[kind]])).named_parameters())
    edit_weights(tmp_path, lambda t: t.__setitem__(key, torch.randn(live[key].shape)))

    base = make(kind)
    before = snapshot(base)
    with pytest.raises(AdapterLoadError, match=re.escape(repr(key))) as error:
        PeftModel.from_pretrained(base, tmp_path)
    assert ("allow_embedding_layers=True" in str(error.value)) == is_embedding
    assert_bit_identical(base, before)
    assert key in describe(str(tmp_path))["replaces_base_tensors"]  # peft inspect shows it


def test_a_file_cannot_write_into_another_adapter(make, tmp_path):
    model = get_peft_model(make("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "second")
    other = "base_model.model.model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight"
    edit_weights(tmp_path / "second", lambda t: t.__setitem__(other, torch.zeros(4, 64)))
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match=re.escape(repr(other))):
        model.load_adapter(tmp_path / "second", "second")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


# --- declared base tensors load, and come back on delete ----------------------------------------------------


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_load_and_deleting_the_adapter_restores_the_base(make, tmp_path, bias):
    hf = hf_adapter(make("gpt2"), tmp_path / "biased", target_modules=["c_attn", "c_proj"], bias=bias)
    base = make("gpt2")
    before = snapshot(base)
    loaded = PeftModel.from_pretrained(base, tmp_path / "biased")
    torch.testing.assert_close(logits(loaded), logits(hf))
    assert describe(str(tmp_path / "biased"))["replaces_base_tensors"]  # the biases, listed by peft inspect
    assert_bit_identical(loaded.unload(), before)

    # Loaded beside another adapter and deleted: the base and the other adapter are as they were.
    model = get_peft_model(make("gpt2"), LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
    expected = logits(model)
    state = snapshot(model)
    model.load_adapter(tmp_path / "biased", "biased")
    model.set_adapter("biased")
    torch.testing.assert_close(logits(model), logits(hf))
    model.delete_adapter("biased")
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_trained_biases_stay_in_a_merged_model_and_go_when_dropped(make, tmp_path):
    hf_adapter(make("gpt2"), tmp_path / "biased", target_modules=["c_attn"], bias="all")
    base = make("gpt2")
    before = snapshot(base)
    model = PeftModel.from_pretrained(base, tmp_path / "biased")
    adapted = logits(model)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), adapted)  # merging keeps what the adapter trained

    model = get_peft_model(make("gpt2"), LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
    plain = logits(model)
    model.load_adapter(tmp_path / "biased", "biased")
    merged = model.merge_and_unload(adapter_names=["default"])  # "biased" is dropped, its biases undone
    torch.testing.assert_close(logits(merged), plain, rtol=1e-5, atol=1e-5)
    merged_state = merged.state_dict()
    assert all(torch.equal(merged_state[k], before[k]) for k in before if k.endswith(".bias"))


def test_a_modules_to_save_original_in_the_file_is_restored_on_delete(make, tmp_path):
    hf_adapter(make("llama"), tmp_path, target_modules=["q_proj"], modules_to_save=["lm_head"])
    original = "base_model.model.lm_head.original_module.weight"
    edit_weights(tmp_path, lambda t: t.__setitem__(original, torch.randn(128, 64)))  # HF saves it for resized bases
    base = make("llama")
    before = snapshot(base)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(loaded.base_model.model.lm_head.original_module.weight,
                               load_file(tmp_path / WEIGHTS)[original])
    assert original in describe(str(tmp_path))["replaces_base_tensors"]
    assert_bit_identical(loaded.unload(), before)


def test_the_base_weight_of_a_targeted_embedding_loads_and_is_restored(make, tmp_path):
    hf = hf_adapter(make("llama"), tmp_path, target_modules=["embed_tokens", "q_proj"])
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    changed = load_file(tmp_path / WEIGHTS)[key] + 0.5  # as trained on a vocabulary whose new rows were set
    edit_weights(tmp_path, lambda t: t.__setitem__(key, changed))
    with torch.no_grad():
        hf.base_model.model.model.embed_tokens.base_layer.weight.copy_(changed)
    base = make("llama")
    before = snapshot(base)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(logits(loaded), logits(hf))
    assert_bit_identical(loaded.unload(), before)


def test_embeddings_hf_saved_for_a_resized_vocabulary_load_when_allowed(make, tmp_path):
    def resized(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = make("llama")
        model.resize_token_embeddings(136)
        return model

    hf = hf_adapter(resized(seed=1), tmp_path, target_modules=["q_proj"])  # HF saves both embeddings: resized
    assert "base_model.model.model.embed_tokens.weight" in load_file(tmp_path / WEIGHTS)
    base = resized(seed=2)  # resized the same way, other new rows
    before = snapshot(base)
    with pytest.raises(AdapterLoadError, match="allow_embedding_layers=True"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_bit_identical(base, before)
    loaded = PeftModel.from_pretrained(base, tmp_path, allow_embedding_layers=True)
    ids = torch.tensor([[130, 131, 5, 9]])  # new tokens: their rows come from the file
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, hf(input_ids=ids).logits)
    assert_bit_identical(loaded.unload(), before)


# --- what adapters may not do to each other -----------------------------------------------------------------


def test_two_adapters_may_not_both_train_the_same_biases(make):
    model = get_peft_model(make("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    before = snapshot(model)
    with pytest.raises(PeftError, match=r"already changes .*Delete or merge 'default' first"):
        model.add_adapter("second", LoraConfig(r=2, target_modules=["c_proj"], bias="lora_only"))
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_a_server_refuses_an_adapter_that_would_change_the_shared_base(make, tmp_path):
    hf_adapter(make("gpt2"), tmp_path / "biased", target_modules=["c_attn"], bias="all")
    get_peft_model(make("gpt2"), LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False)).save_pretrained(
        tmp_path / "plain"
    )
    served = ServingModel(PeftModel.from_pretrained(make("gpt2"), tmp_path / "plain", adapter_name="plain"))
    expected = served(input_ids=IDS).logits
    state = snapshot(served.model)
    with pytest.raises(AdapterLoadError, match="would change .* tensors of the base model .* served from this model"):
        served.load_adapter(tmp_path / "biased", "biased")
    assert list(served.model.peft_config) == ["plain"]
    torch.testing.assert_close(served.model.state_dict(), state, rtol=0, atol=0)
    torch.testing.assert_close(served(input_ids=IDS).logits, expected, rtol=0, atol=0)

    # Served alone it is fine; then no other adapter may join it, since it would run on the changed biases.
    alone = ServingModel(PeftModel.from_pretrained(make("gpt2"), tmp_path / "biased", adapter_name="biased"))
    with pytest.raises(PeftError, match=r"\['biased'\] changed tensors of the base model"):
        alone.load_adapter(tmp_path / "plain", "plain")
    with pytest.raises(PeftError, match="changed tensors of the base model"):
        alone.add_adapter("new", LoraConfig(r=2, target_modules=["c_fc"]))
    assert list(alone.model.peft_config) == ["biased"]


def test_a_server_takes_a_bias_adapter_whose_biases_are_the_base_ones(make, tmp_path):
    untrained = get_peft_model(make("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], bias="all",
                                                         init_lora_weights=False))
    untrained.save_pretrained(tmp_path / "biased")  # saves the base biases as they are
    served = ServingModel(get_peft_model(make("gpt2"), LoraConfig(r=2, target_modules=["c_fc"])))
    served.load_adapter(tmp_path / "biased", "biased")
    assert sorted(served.model.peft_config) == ["biased", "default"]


# --- patterns from a file are bounded -----------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"target_modules": "(.|.)*z"},
    {"target_modules": r".*\.(q_proj|x_proj)", "exclude_modules": "(a*)*b"},
    {"target_modules": ["q_proj"], "rank_pattern": {"(x+x+)+y": 8}, "alpha_pattern": {".*.*.*.*.*.*.*.*z": 2}},
    {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "(a|aa)*c"},
])
def test_a_hostile_pattern_in_a_file_loads_or_is_refused_within_a_second(make, tmp_path, fields):
    get_peft_model(make("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    strip_checksums(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **fields}))
    start = time.perf_counter()
    try:
        PeftModel.from_pretrained(make("llama"), tmp_path)
    except ConfigError as error:
        assert re.search("matched no module|names no block|layers_pattern", str(error)), error
    assert time.perf_counter() - start < 1.0
