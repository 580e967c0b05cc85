"""Saving and loading: round trips, atomic writes, the Hub cache, and clear errors for bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft_core import AdapterLayer, AdapterLoadError, PeftError, PeftModel, PluginError, get_peft_model
from peft_core.testing import tiny_model
from scale_method import ScaleConfig


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def trained_scale_model(llama, seed=3, **config):
    model = get_peft_model(llama, ScaleConfig(target_modules=["o_proj", "up_proj"], **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def test_round_trip_gives_the_same_outputs(llama, llama_dir, tmp_path, input_ids):
    model = trained_scale_model(llama)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(safetensors.torch.load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.o_proj.scale" in keys and len(keys) == 4
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "TEST_SCALE" and config["inference_mode"] is True

    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False: inference
    assert not any(m.training for m in loaded.modules())
    trainable = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_named_adapters_go_to_subfolders_and_load_by_name(llama, llama_dir, tmp_path, input_ids):
    model = trained_scale_model(llama)
    model.add_adapter("other", ScaleConfig(target_modules=["down_proj"], init_value=0.3))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    model.set_adapter("other")
    expected = logits(model, input_ids)

    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, input_ids), expected)


def test_interrupted_save_leaves_the_earlier_adapter_intact(llama, tmp_path, monkeypatch):
    model = trained_scale_model(llama)
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    real_save = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata)
        with open(filename, "r+b") as f:  # half the file written, then the process "dies"
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no stray temp files either


def test_truncated_weights_file_is_reported_and_the_base_is_handed_back(llama, llama_dir, tmp_path, input_ids):
    trained_scale_model(llama).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    base = tiny_model("llama", llama_dir)
    expected = logits(base, input_ids)
    with pytest.raises(AdapterLoadError, match="truncated or corrupt.*save the adapter again"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    torch.testing.assert_close(logits(base, input_ids), expected)


def test_shape_mismatch_names_the_key_and_both_shapes(llama, tmp_path):
    trained_scale_model(llama).save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(AdapterLoadError, match=r"'base_model\.model\.model\.layers\.0\.mlp\.up_proj\.scale' has shape "
                                               r"\(128,\) in the file but \(96,\) in the model"):
        PeftModel.from_pretrained(other, tmp_path)


def test_adapter_of_a_method_not_installed_names_the_package(llama, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "target_modules": ["k_proj"]}))
    with pytest.raises(PluginError, match="pip install peft-loha"):
        PeftModel.from_pretrained(llama, tmp_path)


def test_missing_directory_and_bad_json(llama, tmp_path):
    with pytest.raises(AdapterLoadError, match="not a directory holding a saved adapter"):
        PeftModel.from_pretrained(llama, tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        PeftModel.from_pretrained(llama, tmp_path)


def test_legacy_bin_is_refused_unless_opted_in_and_then_loads_tensors_but_never_code(
    llama, llama_dir, tmp_path, input_ids
):
    model = trained_scale_model(llama)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(weights, tmp_path / "adapter_model.bin")
    fresh = tiny_model("llama", llama_dir)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="pickle file.*allow_legacy_bin=True"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, AdapterLayer) for m in fresh.modules())
    torch.testing.assert_close(fresh.state_dict(), before, rtol=0, atol=0)

    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path, allow_legacy_bin=True)
    torch.testing.assert_close(logits(loaded, input_ids), expected)

    torch.save({"x": Path("/etc/passwd")}, tmp_path / "adapter_model.bin")  # a pickled object, not a tensor
    with pytest.raises(AdapterLoadError, match="never pickled code"):
        PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path, allow_legacy_bin=True)


def _populate_hub_cache(cache: Path, repo: str, revision: str, files: dict[str, Path]) -> None:
    """The layout huggingface_hub keeps on disk: blobs behind snapshots/<commit>, refs/<revision>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(commit)
    for relative, source in files.items():
        target = root / "snapshots" / commit / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())


def test_load_from_a_populated_hub_cache_offline(llama, llama_dir, tmp_path, input_ids, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = trained_scale_model(llama)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "cache"
    files = ("adapter_config.json", "adapter_model.safetensors")
    in_repo = {f"adapters/one/{f}": tmp_path / "saved" / f for f in files}
    _populate_hub_cache(cache, "someone/tiny-adapter", "v1", in_repo)
    loaded = PeftModel.from_pretrained(
        tiny_model("llama", llama_dir), "someone/tiny-adapter", subfolder="adapters/one", revision="v1",
        cache_dir=str(cache),
    )
    torch.testing.assert_close(logits(loaded, input_ids), expected)
    with pytest.raises(AdapterLoadError, match="someone/other.*HF_HUB_OFFLINE"):
        PeftModel.from_pretrained(tiny_model("llama", llama_dir), "someone/other", cache_dir=str(cache))


def test_save_pretrained_takes_hugging_face_peft_arguments_and_refuses_others(llama, tmp_path):
    model = trained_scale_model(llama)
    model.save_pretrained(tmp_path / "a", safe_serialization=True, save_embedding_layers="auto", selected_adapters=None)
    with pytest.raises(TypeError, match="safe_serializaton"):
        model.save_pretrained(tmp_path / "b", safe_serializaton=True)  # a typo is not silently accepted
    for argument in ({"safe_serialization": False}, {"save_embedding_layers": True},
                     {"path_initial_model_for_weight_conversion": "init"}):
        with pytest.raises(PeftError, match="is not supported"):
            model.save_pretrained(tmp_path / "c", **argument)
    with pytest.raises(PeftError, match=r"selected_adapters names \['nope'\]"):
        model.save_pretrained(tmp_path / "c", selected_adapters=["nope"])
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_merge_and_unload_shows_a_progress_bar_when_asked(llama, capsys):
    trained_scale_model(llama).merge_and_unload(progressbar=True)
    assert "Unloading and merging model" in capsys.readouterr().err
