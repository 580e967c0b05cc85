"""Adapters from strangers: loading executes no code, reads nothing outside the adapter, and a file that is
wrong in any way gets one clear error and leaves the model exactly as it was."""

from __future__ import annotations

import ast
import json
import os
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft_core import AdapterLayer, AdapterLoadError, ConfigError, PeftError, PeftModel, get_peft_model
from peft_core.stacking import stack
from peft_core.testing import strip_checksums, tiny_model
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from peft_p_tuning import PromptEncoderConfig
from peft_prompt_tuning import PromptTuningConfig

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Same tensors, same values, and no adapter wrapper or soft prompt left behind."""
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert not hasattr(model, "peft_soft_prompts")
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


@pytest.fixture
def saved_lora(llama_dir, tmp_path) -> Path:
    directory = tmp_path / "adapter"
    get_peft_model(tiny_model("llama", llama_dir), LoraConfig(**LORA)).save_pretrained(directory)
    return directory


def edit_config(directory: Path, **changes) -> None:
    """Edit a saved config as a stranger would hand one out: without this library's checksums."""
    strip_checksums(directory)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(directory: Path, edit) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path)


# --- no code runs -----------------------------------------------------------------------------------


def test_library_code_never_trusts_remote_code():
    """Every transformers ``from_pretrained`` call in the library passes ``trust_remote_code=False``."""
    offenders = []
    for file in [*ROOT.glob("core/src/**/*.py"), *ROOT.glob("plugins/*/src/**/*.py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"):
                continue
            receiver = ast.unparse(node.func.value)
            if not any(part in receiver for part in ("Auto", "auto_class", "transformers")):
                continue  # our own PeftModel / PeftConfig loaders
            passed = {k.arg: k.value for k in node.keywords}
            flag = passed.get("trust_remote_code")
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                offenders.append(f"{file.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
        assert "trust_remote_code=True" not in file.read_text(), file
    assert not offenders, offenders


def test_loading_reads_neither_the_named_base_model_nor_a_tokenizer(llama, llama_dir, tmp_path, monkeypatch):
    """``base_model_name_or_path`` and ``tokenizer_name_or_path`` in a config are information, never loaded."""
    import transformers

    model = get_peft_model(llama, PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    edit_config(tmp_path, base_model_name_or_path="evil/remote-code-model", prompt_tuning_init="TEXT",
                prompt_tuning_init_text="hi", tokenizer_name_or_path="evil/tokenizer",
                tokenizer_kwargs={"trust_remote_code": False, "revision": "main"})

    def refuse(*args, **kwargs):
        raise AssertionError(f"loading an adapter called from_pretrained{args}")

    fresh = tiny_model("llama", llama_dir)
    for auto in ("AutoTokenizer", "AutoConfig", "AutoModel", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", refuse)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(
        loaded.base_model.model.peft_soft_prompts["default"].embedding.weight,
        model.base_model.model.peft_soft_prompts["default"].embedding.weight,
    )


def test_a_config_cannot_ask_the_tokenizer_for_remote_code():
    with pytest.raises(ConfigError, match="trust_remote_code"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
                           tokenizer_name_or_path="t", tokenizer_kwargs={"trust_remote_code": True})


# --- nothing outside the adapter's folder is read -------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside", "/tmp/abs", "a/b", "a.b", "", ".."])
def test_adapter_names_that_are_no_plain_folder_name_are_refused(llama, saved_lora, tmp_path, name):
    model = get_peft_model(llama, LoraConfig(**LORA))
    with pytest.raises(PeftError, match="not a valid adapter name"):
        model.load_adapter(saved_lora, name)
    with pytest.raises(PeftError, match="not a valid adapter name"):
        model.add_adapter(name, LoraConfig(**LORA))
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("subfolder", ["../outside", "/etc", "member/../../outside", "a//b", "C:/x"])
def test_subfolders_that_leave_the_adapter_are_refused(llama, saved_lora, tmp_path, subfolder):
    inside, outside = tmp_path / "adapter", tmp_path / "outside"
    saved_lora.rename(outside)  # a valid adapter to lure the loader to
    inside.mkdir()
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError, match="not a relative path inside the adapter"):
        PeftModel.from_pretrained(llama, inside, subfolder=subfolder)
    assert_unchanged(llama, before)


@pytest.mark.parametrize("member", ["../outside", "/abs/path", "x/../../outside", "."])
def test_stack_manifest_members_must_be_plain_folder_names(llama, saved_lora, tmp_path, member):
    saved_lora.rename(tmp_path / "outside")
    stack_dir = tmp_path / "stack"
    stack_dir.mkdir()
    (stack_dir / "peft_stack.json").write_text(json.dumps({"adapters": [member]}))
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError, match="not a valid adapter name"):
        PeftModel.from_pretrained(llama, stack_dir)
    assert_unchanged(llama, before)


@pytest.mark.parametrize("link", ["adapter_model.safetensors", "adapter_config.json", "member"])
def test_symlinks_leading_out_of_the_adapter_are_refused(llama, saved_lora, tmp_path, link):
    adapter = tmp_path / "links"
    if link == "member":  # a stack whose member folder is a link to an adapter elsewhere
        model = get_peft_model(llama, stack([LoraConfig(**LORA), IA3Config(target_modules=["k_proj"],
                                                                          feedforward_modules=[])]))
        model.save_pretrained(adapter)
        model.unload()
        os.rename(adapter / "ia3", tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", adapter / "ia3")
    else:
        adapter.mkdir()
        for file in ("adapter_model.safetensors", "adapter_config.json"):
            if file == link:
                os.symlink(saved_lora / file, adapter / file)
            else:
                (adapter / file).write_bytes((saved_lora / file).read_bytes())
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError, match="leads outside the adapter's directory"):
        PeftModel.from_pretrained(llama, adapter)
    assert_unchanged(llama, before)


def test_symlinks_within_the_adapter_and_into_a_hub_cache_blob_store_load(llama, llama_dir, saved_lora, tmp_path):
    """huggingface_hub's cache keeps files as ``snapshots/<commit>/name -> ../../blobs/<hash>``."""
    repo = tmp_path / "models--user--adapter"
    snapshot_dir, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot_dir.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(("adapter_model.safetensors", "adapter_config.json")):
        (blobs / f"blob{i}").write_bytes((saved_lora / file).read_bytes())
        os.symlink(Path("..", "..", "blobs", f"blob{i}"), snapshot_dir / file)
    expected = PeftModel.from_pretrained(tiny_model("llama", llama_dir), saved_lora)
    loaded = PeftModel.from_pretrained(llama, snapshot_dir)
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(loaded(ids).logits, expected(ids).logits)


# --- hostile or broken configs ------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("r", "8", r"LoraConfig\.r must be int"),
    ("target_modules", 5, r"target_modules"),
    ("lora_alpha", [1], r"LoraConfig\.lora_alpha must be"),
    ("lora_dropout", "0.1", r"LoraConfig\.lora_dropout must be"),
    ("rank_pattern", {"q_proj": "x"}, r"rank_pattern"),
    ("layers_to_transform", "abc", r"layers_to_transform"),
    ("r", -3, r"r must be a positive integer"),
])
def test_wrong_types_and_values_name_the_file_and_field(llama, saved_lora, field, value, message):
    edit_config(saved_lora, **{field: value})
    before = snapshot(llama)
    with pytest.raises(ConfigError, match=message) as error:
        PeftModel.from_pretrained(llama, saved_lora)
    assert str(saved_lora / "adapter_config.json") in str(error.value)
    assert_unchanged(llama, before)


def test_a_huge_rank_fails_before_allocating(llama, saved_lora):
    edit_config(saved_lora, r=10**9)
    before = snapshot(llama)
    # 10**9 x (64 + 64) float32 per layer would be ~500 GB: refused from the layer's shape, not by the allocator.
    with pytest.raises(ConfigError, match=r"rank 1000000000 for '.*q_proj' \(64 -> 64\) exceeds"):
        PeftModel.from_pretrained(llama, saved_lora)
    assert_unchanged(llama, before)


def test_a_huge_rank_for_one_late_layer_leaves_no_earlier_layer_wrapped(llama, saved_lora):
    edit_config(saved_lora, rank_pattern={"layers.1.self_attn.v_proj": 10**6})
    before = snapshot(llama)
    with pytest.raises(ConfigError, match="exceeds"):
        PeftModel.from_pretrained(llama, saved_lora)
    assert_unchanged(llama, before)


@pytest.mark.parametrize(("config", "message"), [
    (PromptTuningConfig(num_virtual_tokens=10**9, task_type="CAUSAL_LM"), "takes at most 128 positions"),
    (PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=10**9, task_type="CAUSAL_LM"),
     "would need .* GiB for its weights"),
    (PromptTuningConfig(num_virtual_tokens=4, token_dim=10**9, task_type="CAUSAL_LM"),
     r"token_dim is 1000000000, but .* has 64"),
])
def test_huge_soft_prompts_fail_before_allocating(llama, config, message):
    before = snapshot(llama)
    with pytest.raises(ConfigError, match=message):
        get_peft_model(llama, config)
    assert_unchanged(llama, before)


def test_missing_peft_type_names_the_file(llama, saved_lora):
    strip_checksums(saved_lora)
    config = json.loads((saved_lora / "adapter_config.json").read_text())
    del config["peft_type"]
    (saved_lora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"adapter_config\.json: .*no 'peft_type'"):
        PeftModel.from_pretrained(llama, saved_lora)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe garbage", ""])
def test_unreadable_config_files_are_one_clear_error(llama, saved_lora, text):
    (saved_lora / "adapter_config.json").write_bytes(text.encode("latin-1"))
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json (is not valid JSON|holds no JSON object)"):
        PeftModel.from_pretrained(llama, saved_lora)
    assert_unchanged(llama, before)


@pytest.mark.parametrize(("text", "message"), [
    ("[" * 200_000 + "]" * 200_000, "nest thousands of levels deep"),
    ('{"peft_type": "LORA", "r": 1' + "0" * 5000 + "}", r": 'r' is an integer of 5001 digits"),
    ('{"peft_type": "LORA", "rank_pattern": {"q_proj": -9' + "9" * 5000 + "}}",
     r": 'rank_pattern'\['q_proj'\] is an integer of 5001 digits"),
])
def test_a_config_no_parser_should_take_is_one_clear_error_naming_the_file(llama, saved_lora, text, message):
    strip_checksums(saved_lora)
    (saved_lora / "adapter_config.json").write_text(text)
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError, match=message) as error:
        PeftModel.from_pretrained(llama, saved_lora)
    assert str(saved_lora / "adapter_config.json") in str(error.value)
    assert_unchanged(llama, before)


def test_a_stack_manifest_no_parser_should_take_names_the_file(llama, saved_lora):
    (saved_lora / "peft_stack.json").write_text('{"adapters": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(AdapterLoadError, match=r"peft_stack\.json is not valid JSON"):
        PeftModel.from_pretrained(llama, saved_lora)


def test_unknown_fields_warn_and_load(llama, llama_dir, saved_lora):
    expected = PeftModel.from_pretrained(tiny_model("llama", llama_dir), saved_lora)
    edit_config(saved_lora, shiny_new_option=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(llama, saved_lora)
    assert any("shiny_new_option=3" in str(w.message) for w in caught)
    ids = torch.tensor([[4, 8, 15, 16]])
    torch.testing.assert_close(loaded(ids).logits, expected(ids).logits)


# --- broken weights -----------------------------------------------------------------------------------

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.__setitem__(A_KEY, t[A_KEY].to(torch.int64)), r"stores '.*lora_A\.weight' as torch\.int64"),
    (lambda t: t.__setitem__(A_KEY, t[A_KEY][:2]), r"has shape \(2, 64\) in the file but \(4, 64\)"),
    (lambda t: t.__setitem__("base_model.model.model.evil.weight", torch.zeros(2)), "has no place for"),
    (lambda t: t.pop(A_KEY), r"lacks 1 weights .*lora_A\.weight"),
])
def test_broken_weights_are_refused_and_the_model_is_unchanged(llama, saved_lora, edit, message):
    edit_weights(saved_lora, edit)
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError, match=message) as error:
        PeftModel.from_pretrained(llama, saved_lora)
    assert str(saved_lora) in str(error.value)
    assert_unchanged(llama, before)

    # Into a model that has adapters: those stay as they were, and no half-loaded adapter is left.
    model = get_peft_model(llama, LoraConfig(**LORA))
    existing = snapshot(model)
    with pytest.raises(AdapterLoadError, match=message):
        model.load_adapter(saved_lora, "second")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model.state_dict(), existing, rtol=0, atol=0)


def test_a_truncated_weights_file_is_refused(llama, saved_lora):
    path = saved_lora / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        PeftModel.from_pretrained(llama, saved_lora)
    assert_unchanged(llama, before)


def test_fields_set_after_building_are_checked_when_the_adapter_is_added(llama):
    config = LoraConfig(**LORA)
    config.r = "8"
    before = snapshot(llama)
    with pytest.raises(ConfigError, match=r"LoraConfig\.r must be int, not str"):
        get_peft_model(llama, config)
    assert_unchanged(llama, before)
