"""Tied embeddings and resized vocabularies: training, saving, loading, merging and unloading stay correct.

Hugging Face PEFT 0.21.2 is the oracle for what trains and what is saved, and its files and ours load into
each other with equal logits. Where its merge of an adapter on a tied weight changes the other side too (it
writes into the one shared tensor), ours must keep the unmerged model's outputs: merging unties. Every adapter
is perturbed away from its no-op start, so each comparison can fail.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft_core import AdapterLayer, AdapterLoadError, ConfigError, PeftModel, get_peft_model
from peft_core.testing import tiny_model
from peft_core.testing.training import train_steps
from peft_lora import LoraConfig
from safetensors.torch import load_file
from torch import nn

VOCAB, RESIZED = 128, 136
WEIGHTS = "adapter_model.safetensors"
# Model kind -> (input embedding, output head), which share one weight in these models.
TIED = {"llama": ("model.embed_tokens", "lm_head"), "gpt2": ("transformer.wte", "lm_head")}
ATTENTION = {"llama": "q_proj", "gpt2": "c_attn"}


@pytest.fixture(scope="session")
def make_tied(tmp_path_factory: pytest.TempPathFactory):
    """``make_tied(kind)``: a fresh tiny model whose output head uses the input embedding's weight."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=True,
    )).save_pretrained(root / "llama")

    def make(kind: str) -> nn.Module:
        model = tiny_model("gpt2", root / "gpt2") if kind == "gpt2" else \
            AutoModelForCausalLM.from_pretrained(root / "llama").eval()
        assert weight(model, TIED[kind][0]) is weight(model, TIED[kind][1])
        return model

    return make


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight a module computes with (through adapter wrappers), or its active trained copy's."""
    module = model.get_submodule(name)
    copies = getattr(module, "modules_to_save", None)
    return copies["default"].weight if copies is not None else module.weight


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor away from its start, so that no adapter is a no-op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def hf_model(base: nn.Module, settings: dict[str, Any]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's advice about tied weights and saving embeddings
        return peft.get_peft_model(base, peft.LoraConfig(r=4, init_lora_weights=False, **settings))


def hf_load(base: nn.Module, directory: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, directory).eval()


def hf_save(model: nn.Module, directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF announcing that it saves the embeddings too
        model.save_pretrained(directory)


def saved_keys(directory: Path) -> set[str]:
    return set(load_file(directory / WEIGHTS))


# --- LoRA on a tied weight -------------------------------------------------------------------------------

LORA_ON_TIED = [("llama", ["embed_tokens"]), ("llama", ["lm_head"]), ("llama", ["embed_tokens", "lm_head", "q_proj"]),
                ("gpt2", ["wte"]), ("gpt2", ["wte", "lm_head"])]


@pytest.mark.parametrize(("kind", "targets"), LORA_ON_TIED, ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_lora_on_a_tied_weight_merges_into_a_copy_and_unmerges_to_the_tie(make_tied, ids, kind, targets) -> None:
    base = make_tied(kind)
    shared = weight(base, TIED[kind][0])
    original = shared.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    losses = train_steps(model, ids, steps=4)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(shared, original, rtol=0, atol=0)  # the tied base weight is frozen
    adapted = logits(model, ids)

    # HF's merge writes into the one shared tensor, changing the untargeted side too; ours gives each
    # merged side its own weight.
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), adapted)
    assert weight(base, TIED[kind][0]) is not weight(base, TIED[kind][1])
    model.unmerge_adapter()
    assert weight(base, TIED[kind][0]) is weight(base, TIED[kind][1]) is shared
    torch.testing.assert_close(shared, original, rtol=0, atol=0)

    with pytest.warns(UserWarning, match="no longer tied"):
        merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), adapted)
    assert not merged.config.tie_word_embeddings  # transformers would tie them again otherwise
    for name in TIED[kind]:
        targeted = name.rsplit(".", 1)[-1] in targets
        assert (weight(merged, name) is shared) is not targeted


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_unload_gives_back_the_tied_model(make_tied, ids, kind) -> None:
    base = make_tied(kind)
    shared, before = weight(base, TIED[kind][0]), logits(base, ids)
    embedding = TIED[kind][0].rsplit(".", 1)[-1]
    model = get_peft_model(base, LoraConfig(r=4, target_modules=[embedding, "lm_head"], init_lora_weights=False))
    model.merge_adapter()
    unloaded = model.unload()
    assert weight(unloaded, TIED[kind][0]) is weight(unloaded, TIED[kind][1]) is shared
    assert unloaded.config.tie_word_embeddings
    torch.testing.assert_close(logits(unloaded, ids), before)


# --- modules_to_save on tied embeddings ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_modules_to_save_train_a_copy_per_side_as_hf_does(make_tied, ids, tmp_path, kind) -> None:
    base = make_tied(kind)
    shared = weight(base, TIED[kind][0])
    original = shared.detach().clone()
    settings = dict(target_modules=[ATTENTION[kind]], modules_to_save=[n.rsplit(".", 1)[-1] for n in TIED[kind]])
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False, **settings))
    hf = hf_model(make_tied(kind), settings)
    assert model.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    train_steps(model, ids, steps=3)
    embedding_copy, head_copy = (weight(base, name) for name in TIED[kind])
    assert not torch.equal(embedding_copy, head_copy)  # trained apart, from the same start
    torch.testing.assert_close(shared, original, rtol=0, atol=0)
    adapted = logits(model, ids)

    model.save_pretrained(tmp_path / "ours")
    hf_save(hf, tmp_path / "hf")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "hf")  # one tensor per side, as HF saves
    loaded = PeftModel.from_pretrained(make_tied(kind), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded, ids), adapted)
    with pytest.warns(UserWarning, match="no longer tied"):
        merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), adapted)
    assert not merged.config.tie_word_embeddings
    unloaded = loaded.unload()
    assert weight(unloaded, TIED[kind][0]) is weight(unloaded, TIED[kind][1])
    torch.testing.assert_close(logits(unloaded, ids), logits(make_tied(kind), ids))


@pytest.mark.parametrize(("kind", "save"), [
    ("llama", ["embed_tokens", "lm_head"]), ("llama", ["lm_head"]), ("llama", ["embed_tokens"]),
    ("gpt2", ["wte", "lm_head"]),
], ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_ensure_weight_tying_trains_one_copy_for_both_sides(make_tied, ids, tmp_path, kind, save) -> None:
    base = make_tied(kind)
    shared = weight(base, TIED[kind][0])
    original = shared.detach().clone()
    settings = dict(target_modules=[ATTENTION[kind]], modules_to_save=save, ensure_weight_tying=True)
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False, **settings))
    hf = hf_model(make_tied(kind), settings)
    assert weight(base, TIED[kind][0]) is weight(base, TIED[kind][1]) is not shared
    assert model.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    train_steps(model, ids, steps=3)
    torch.testing.assert_close(shared, original, rtol=0, atol=0)
    assert not torch.equal(weight(base, TIED[kind][0]), original)
    adapted = logits(model, ids)

    model.save_pretrained(tmp_path / "ours")
    hf_save(hf, tmp_path / "hf")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "hf")
    loaded = PeftModel.from_pretrained(make_tied(kind), tmp_path / "ours")
    assert weight(loaded, f"base_model.model.{TIED[kind][0]}") is weight(loaded, f"base_model.model.{TIED[kind][1]}")
    torch.testing.assert_close(logits(loaded, ids), adapted)
    merged = model.merge_and_unload()
    assert weight(merged, TIED[kind][0]) is weight(merged, TIED[kind][1]) and merged.config.tie_word_embeddings
    torch.testing.assert_close(logits(merged, ids), adapted)
    unloaded = loaded.unload()
    assert weight(unloaded, TIED[kind][0]) is weight(unloaded, TIED[kind][1])
    torch.testing.assert_close(logits(unloaded, ids), logits(make_tied(kind), ids))


def test_ensure_weight_tying_with_lora_on_a_tied_embedding_is_refused(make_tied) -> None:
    base = make_tied("llama")
    with pytest.raises(ConfigError, match=r"ensure_weight_tying.*modules_to_save=\['embed_tokens'\]"):
        get_peft_model(base, LoraConfig(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True))
    assert not any(isinstance(module, AdapterLayer) for module in base.modules())  # left as it was


def test_ensure_weight_tying_without_a_tie_warns_and_ties_nothing(make_tied) -> None:
    base = make_tied("gpt2")  # HF ties only for embed_tokens / lm_head entries, not GPT-2's 'wte'
    with pytest.warns(UserWarning, match="neither embed_tokens nor lm_head; nothing is tied"):
        get_peft_model(base, LoraConfig(target_modules=["c_attn"], modules_to_save=["wte"], ensure_weight_tying=True))
    assert weight(base, "transformer.wte") is not weight(base, "lm_head")


CROSS_LOAD = [
    ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    ("llama", dict(target_modules=["lm_head"])),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)),
    ("gpt2", dict(target_modules=["wte", "c_attn"])),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True)),
]


@pytest.mark.parametrize(("kind", "settings"), CROSS_LOAD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CROSS_LOAD)])
def test_tied_adapters_load_in_hf_peft_and_back(make_tied, ids, tmp_path, kind, settings) -> None:
    ours = get_peft_model(make_tied(kind), LoraConfig(r=4, init_lora_weights=False, **settings))
    perturb(ours, seed=1)
    ours.save_pretrained(tmp_path / "ours")
    torch.testing.assert_close(logits(hf_load(make_tied(kind), tmp_path / "ours"), ids), logits(ours, ids))

    hf = hf_model(make_tied(kind), settings)
    perturb(hf, seed=2)
    hf_save(hf, tmp_path / "hf")
    loaded = PeftModel.from_pretrained(make_tied(kind), tmp_path / "hf")
    torch.testing.assert_close(logits(loaded, ids), logits(hf, ids))
    # What we save is what HF saves, less the base weights of targeted embeddings that HF adds
    # (save_embedding_layers="auto"): no tied tensor is saved twice where HF saves it once.
    ours_keys, hf_keys = saved_keys(tmp_path / "ours"), saved_keys(tmp_path / "hf")
    assert ours_keys <= hf_keys and all(key.endswith(".base_layer.weight") for key in hf_keys - ours_keys)


def test_an_hf_adapter_with_trainable_token_indices_is_refused(make_tied, tmp_path) -> None:
    hf = hf_model(make_tied("llama"), dict(target_modules=["q_proj"], trainable_token_indices=[3, 5]))
    hf_save(hf, tmp_path)
    base = make_tied("llama")
    with pytest.warns(UserWarning, match="trainable_token_indices"), \
            pytest.raises(AdapterLoadError, match="trainable_tokens_delta"):
        PeftModel.from_pretrained(base, tmp_path)


# --- resized vocabularies --------------------------------------------------------------------------------


def resized(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with room for RESIZED - VOCAB new tokens; their rows are random, drawn with ``seed``."""
    torch.manual_seed(seed)
    model.resize_token_embeddings(RESIZED)
    return model


@pytest.fixture
def new_token_ids() -> torch.Tensor:
    """Inputs that use the new tokens."""
    return torch.randint(VOCAB - 8, RESIZED, (2, 9), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resized_vocabulary_with_embeddings_in_modules_to_save(
    make_tied, llama_dir, new_token_ids, tmp_path, tied
) -> None:
    def fresh(seed: int) -> nn.Module:
        return resized(make_tied("llama") if tied else tiny_model("llama", llama_dir), seed)

    settings = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    model = get_peft_model(fresh(seed=1), LoraConfig(r=4, init_lora_weights=False, **settings))
    train_steps(model, new_token_ids, steps=3)
    trained = logits(model, new_token_ids)
    assert trained.shape[-1] == RESIZED
    model.save_pretrained(tmp_path / "ours")

    # A base resized the same way, whose new rows were drawn differently: the adapter carries what matters.
    loaded = PeftModel.from_pretrained(fresh(seed=2), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded, new_token_ids), trained)
    torch.testing.assert_close(logits(hf_load(fresh(seed=2), tmp_path / "ours"), new_token_ids), trained)

    hf = hf_model(fresh(seed=1), settings)
    perturb(hf, seed=2)
    hf_save(hf, tmp_path / "hf")  # HF adds the original rows too: it noticed the resize
    loaded = PeftModel.from_pretrained(fresh(seed=2), tmp_path / "hf")
    torch.testing.assert_close(logits(loaded, new_token_ids), logits(hf, new_token_ids))

    fix = rf"vocabulary of {RESIZED} tokens.*resize_token_embeddings\({RESIZED}\)"
    with pytest.raises(AdapterLoadError, match=fix):
        PeftModel.from_pretrained(make_tied("llama") if tied else tiny_model("llama", llama_dir), tmp_path / "ours")


def test_lora_on_a_resized_embedding_into_an_unresized_base_names_the_fix(llama, llama_dir, tmp_path) -> None:
    model = get_peft_model(resized(llama, seed=1), LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"]))
    model.save_pretrained(tmp_path)
    base = tiny_model("llama", llama_dir)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    with pytest.raises(AdapterLoadError, match=rf"resize_token_embeddings\({RESIZED}\)"):
        PeftModel.from_pretrained(base, tmp_path)
    after = dict(base.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
