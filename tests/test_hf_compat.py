"""Cross-library tests: adapters move between peft-core (+ peft-lora) and Hugging Face PEFT unchanged.

For every case (a model kind and LoRA settings) the same adapter goes both ways:

* saved by us, loaded by HF ``peft``: same logits, HF reads our ``adapter_config.json`` without complaining
  about unknown keys, and HF re-saving it gives the same keys and the same tensors as our file;
* saved by HF, loaded by us: same logits, no warnings from us, and our re-save matches HF's file;
* ``merge_and_unload`` of the same adapter gives the same plain model in both libraries;
* our ``adapter_config.json`` holds the values HF writes for the same settings.

Several adapters ('default' at the top, others in subfolders) go both ways too, are merged together and run
together.

Adapters are never no-ops: every adapter weight (and modules_to_save copy, and trained bias) is perturbed
before saving, and each test checks that the adapter changes the logits, so a comparison can fail.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_lora import LoraConfig
from safetensors.torch import load_file
from torch import nn

ATOL = RTOL = 1e-5
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # a model of tests/conftest.py
    lora: dict[str, Any]  # LoraConfig arguments, the same for both libraries
    # Keys HF saves on top of the adapter: the base weights of targeted embeddings (HF's
    # save_embedding_layers="auto" saves them whenever an embedding named like embed_tokens is targeted).
    hf_extra_keys: tuple[str, ...] = ()


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]

CASES = [
    Case("llama", "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)),
    Case("llama-all-linear-exclude", "llama", dict(
        target_modules="all-linear", exclude_modules=["o_proj"], r=4, lora_alpha=16,
    )),
    Case("llama-regex-exclude", "llama", dict(
        target_modules=r".*\.(q_proj|v_proj|up_proj)", exclude_modules=["layers.0.mlp.up_proj"], r=4,
    )),
    Case("llama-pissa", "llama", dict(
        target_modules=["q_proj", "v_proj", "down_proj"], r=4, init_lora_weights="pissa",
    )),
    Case("llama-dora", "llama", dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8, use_dora=True)),
    Case("llama-rslora", "llama", dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8, use_rslora=True)),
    Case("llama-patterns", "llama", dict(
        target_modules=LLAMA_ALL, r=4, lora_alpha=8,
        rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        alpha_pattern={"o_proj": 3, r"layers\.0\.self_attn\.q_proj": 32},
    )),
    Case("llama-layers", "llama", dict(
        target_modules=LLAMA_ALL, r=4, layers_to_transform=[1], layers_pattern="layers",
    )),
    Case("llama-layers-no-pattern", "llama", dict(
        target_modules=["q_proj", "down_proj"], layers_to_transform=0,
    )),
    Case("llama-embedding", "llama", dict(target_modules=["embed_tokens", "lm_head", "q_proj"], r=4),
         hf_extra_keys=(
             "base_model.model.model.embed_tokens.base_layer.weight", "base_model.model.lm_head.base_layer.weight",
         )),
    Case("gpt2", "gpt2", dict(target_modules=GPT2_ALL, r=4, lora_alpha=8)),
    Case("gpt2-dora-dropout", "gpt2", dict(target_modules=GPT2_ALL, r=4, use_dora=True, lora_dropout=0.1)),
    Case("gpt2-dora-rslora-patterns", "gpt2", dict(
        target_modules=GPT2_ALL, r=4, lora_alpha=8, use_dora=True, use_rslora=True,
        rank_pattern={"c_fc": 2}, alpha_pattern={r"h\.1\.attn\.c_attn": 2},
    )),
    Case("gpt2-layers", "gpt2", dict(target_modules=GPT2_ALL, r=4, layers_to_transform=[1])),
    Case("gpt2-bias-all", "gpt2", dict(target_modules=["c_attn", "c_proj"], r=4, bias="all")),
    Case("gpt2-bias-lora_only", "gpt2", dict(target_modules=["c_attn", "c_proj"], r=4, bias="lora_only")),
    Case("bert-seqcls", "bert", dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4)),
    Case("bert-seqcls-dora", "bert", dict(
        task_type="SEQ_CLS", target_modules=["query", "key", "value", "dense"], r=4, use_dora=True,
    )),
    Case("bert-seqcls-layers", "bert", dict(
        task_type="SEQ_CLS", target_modules=["query", "value"], layers_to_transform=[0], layers_pattern="layer",
    )),
    Case("bert-seqcls-bias-all", "bert", dict(
        task_type="SEQ_CLS", target_modules=["query", "value"], bias="all",
    )),
    Case("bert-seqcls-bias-lora_only", "bert", dict(
        task_type="SEQ_CLS", target_modules=["query", "value"], bias="lora_only",
    )),
    Case("conv2d", "conv", dict(target_modules=["conv1", "conv2", "conv3"], r=2, modules_to_save=["head"])),
    Case("conv2d-dora", "conv", dict(
        target_modules=["conv1", "conv2", "conv3"], r=2, lora_alpha=4, use_dora=True,
    )),
    Case("embedding-custom", "embnet", dict(target_modules=["emb", "proj"], r=4)),
]


def case_param(cases: list[Case]) -> Any:
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


# --- helpers -----------------------------------------------------------------------------------------


Inputs = dict[str, torch.Tensor]
Settings = dict[str, Any]  # LoraConfig arguments


def logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def perturb(model: nn.Module, adapter_name: str = "default", seed: int = 1) -> None:
    """Add noise to every weight of the adapter (and every trainable parameter): no adapter is a no-op.

    Adapter weights are found by the adapter name in the parameter name, which both libraries have
    (``...lora_A.default.weight`` in HF, ``...adapters.default.lora_A.weight`` here, and
    ``...modules_to_save.default...`` in both).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or f".{adapter_name}." in f".{name}.":
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def key_message(key: str) -> Callable[[str], str]:
    return lambda message: f"{key}: {message}"


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def assert_adapter_matters(adapted: torch.Tensor, base: torch.Tensor) -> None:
    """The adapter must move the logits far beyond the tolerance, or comparisons prove nothing."""
    difference = (adapted - base).abs().max().item()
    assert difference > 1e-3, f"The adapter barely changes the logits (max diff {difference:.2e})."


def record_warnings(action: Callable[[], Any]) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = action()
    return result, [str(w.message) for w in caught]


def problem_warnings(messages: list[str]) -> list[str]:
    """Warnings that signal a format mismatch: unknown config keys, missing or unused weights."""
    markers = ("unexpected keyword", "missing adapter keys", "does not support", "lacks", "ignoring")
    return [m for m in messages if any(marker in m.lower() for marker in markers)]


def build_ours(base: nn.Module, lora: Settings, adapters: dict[str, Settings] | None = None) -> PeftModel:
    """Our model with a perturbed 'default' adapter (and more named ``adapters``), in eval mode."""
    model = get_peft_model(base, LoraConfig(**lora))
    for name, extra in (adapters or {}).items():
        model.add_adapter(name, LoraConfig(**extra))
    for seed, name in enumerate(model.peft_config, start=1):
        perturb(model, name, seed)
    return model.eval()


def build_hf(base: nn.Module, lora: Settings, adapters: dict[str, Settings] | None = None) -> nn.Module:
    """HF's model with a perturbed 'default' adapter (and more named ``adapters``), in eval mode."""
    model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    for name, extra in (adapters or {}).items():
        model.add_adapter(name, peft.LoraConfig(**extra))
    for seed, name in enumerate(model.peft_config, start=1):
        perturb(model, name, seed)
    return model.eval()


def load_with_hf(base: nn.Module, path: Path, extra: tuple[str, ...] = ()) -> nn.Module:
    """Load an adapter saved by us into HF ``peft`` (plus named ones from subfolders); fail on warnings."""

    def load() -> nn.Module:
        model = peft.PeftModel.from_pretrained(base, path)
        for name in extra:
            model.load_adapter(path / name, adapter_name=name)
        return model

    model, messages = record_warnings(load)
    assert not problem_warnings(messages), f"HF peft warned loading our adapter: {messages}"
    return model.eval()


def load_with_ours(base: nn.Module, path: Path, extra: tuple[str, ...] = ()) -> PeftModel:
    """Load an adapter saved by HF into ours (plus named ones from subfolders); fail on warnings."""

    def load() -> PeftModel:
        model = PeftModel.from_pretrained(base, path)
        for name in extra:
            model.load_adapter(path / name, adapter_name=name)
        return model

    model, messages = record_warnings(load)
    assert not problem_warnings(messages), f"peft-core warned loading HF's adapter: {messages}"
    return model.eval()


def assert_same_adapter_file(ours: Path, theirs: Path, hf_extra_keys: tuple[str, ...] = ()) -> None:
    """Same keys (HF may add ``hf_extra_keys``, no more) and bitwise-equal tensors in both saved files."""
    mine, hf = load_file(ours / WEIGHTS), load_file(theirs / WEIGHTS)
    assert sorted(set(mine) - set(hf)) == [], "keys only in our file"
    assert sorted(set(hf) - set(mine)) == sorted(hf_extra_keys), "keys only in HF's file"
    for key, tensor in mine.items():
        assert hf[key].dtype == tensor.dtype, key
        torch.testing.assert_close(hf[key], tensor, atol=0, rtol=0, msg=key_message(key))


def assert_same_state_dict(ours: nn.Module, theirs: nn.Module) -> None:
    our_state, hf_state = ours.state_dict(), theirs.state_dict()
    assert sorted(our_state) == sorted(hf_state)
    for key, tensor in our_state.items():
        torch.testing.assert_close(tensor, hf_state[key], atol=ATOL, rtol=RTOL, msg=key_message(key))


def assert_hf_knows_config_keys(path: Path) -> None:
    """Every key of our adapter_config.json is a field of HF's LoraConfig."""
    saved = json.loads((path / CONFIG).read_text())
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert sorted(set(saved) - known) == [], "adapter_config.json keys HF's LoraConfig does not have"


# --- single adapters ------------------------------------------------------------------------------------


@case_param(CASES)
def test_ours_to_hf(case: Case, make_base, make_inputs, tmp_path: Path) -> None:
    inputs = make_inputs(case.kind)
    base_logits = logits(make_base(case.kind), inputs)
    ours = build_ours(make_base(case.kind), case.lora)
    expected = logits(ours, inputs)
    assert_adapter_matters(expected, base_logits)
    ours.save_pretrained(tmp_path / "ours")
    assert_hf_knows_config_keys(tmp_path / "ours")

    hf = load_with_hf(make_base(case.kind), tmp_path / "ours")
    assert_same_logits(logits(hf, inputs), expected)

    hf.save_pretrained(tmp_path / "hf")
    assert_same_adapter_file(tmp_path / "ours", tmp_path / "hf", case.hf_extra_keys)


@case_param(CASES)
def test_hf_to_ours(case: Case, make_base, make_inputs, tmp_path: Path) -> None:
    inputs = make_inputs(case.kind)
    base_logits = logits(make_base(case.kind), inputs)
    hf = build_hf(make_base(case.kind), case.lora)
    expected = logits(hf, inputs)
    assert_adapter_matters(expected, base_logits)
    hf.save_pretrained(tmp_path / "hf")

    ours = load_with_ours(make_base(case.kind), tmp_path / "hf")
    assert_same_logits(logits(ours, inputs), expected)

    ours.save_pretrained(tmp_path / "ours")
    assert_same_adapter_file(tmp_path / "ours", tmp_path / "hf", case.hf_extra_keys)


@case_param(CASES)
def test_merge_and_unload_matches_hf(case: Case, make_base, make_inputs, tmp_path: Path) -> None:
    inputs = make_inputs(case.kind)
    hf = build_hf(make_base(case.kind), case.lora)
    adapted = logits(hf, inputs)
    hf.save_pretrained(tmp_path)
    ours = load_with_ours(make_base(case.kind), tmp_path)

    hf_merged, our_merged = hf.merge_and_unload(), ours.merge_and_unload()
    assert type(our_merged) is type(hf_merged)
    assert_same_logits(logits(our_merged, inputs), logits(hf_merged, inputs))
    assert_same_logits(logits(our_merged, inputs), adapted)
    assert_same_state_dict(our_merged, hf_merged)


def normalized_config(path: Path) -> dict[str, Any]:
    """adapter_config.json with HF's equivalent spellings unified: lists as sorted lists, ints as [int]."""
    config = json.loads((path / CONFIG).read_text())
    for key, value in config.items():
        if key == "layers_to_transform" and isinstance(value, int):
            config[key] = [value]
        elif isinstance(value, list):
            config[key] = sorted(set(value))
    return config


@case_param(CASES)
def test_saved_config_matches_hf(case: Case, make_base, tmp_path: Path) -> None:
    """Our adapter_config.json says what HF's says for the same adapter, key by key (HF writes more keys)."""
    build_ours(make_base(case.kind), case.lora).save_pretrained(tmp_path / "ours")
    build_hf(make_base(case.kind), case.lora).save_pretrained(tmp_path / "hf")
    ours, hf = normalized_config(tmp_path / "ours"), normalized_config(tmp_path / "hf")
    if ours["target_modules"] == "all-linear":
        del ours["target_modules"]  # HF writes out the names it found; both spellings load the same
    differing = {key: (value, hf.get(key)) for key, value in ours.items() if hf.get(key) != value}
    assert differing == {}, "config values that differ, as (ours, HF's)"


# --- several adapters --------------------------------------------------------------------------------------

MULTI_CASES = [
    Case("llama", "llama", dict(target_modules=["q_proj", "v_proj"], r=4)),
    Case("bert-seqcls", "bert", dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4)),
]
OTHER = {
    # Overlapping targets (q_proj, query), so that merging both adapters stacks them on one layer.
    "llama": dict(target_modules=["q_proj", "o_proj", "up_proj"], r=2, lora_alpha=4, use_dora=True),
    "bert": dict(task_type="SEQ_CLS", target_modules=["query", "dense"], r=2, use_rslora=True),
}


def logits_per_adapter(model: nn.Module, inputs: Inputs, names: list[str]) -> dict[str, torch.Tensor]:
    found = {}
    for name in names:
        model.set_adapter(name)
        found[name] = logits(model, inputs)
    model.set_adapter("default")
    return found


def assert_same_adapter_dirs(ours: Path, theirs: Path) -> None:
    """Both libraries lay out adapters alike ('default' on top, others in subfolders), with equal weights."""

    def adapter_files(root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for name in (WEIGHTS, CONFIG) for p in root.rglob(name))

    expected = sorted([CONFIG, WEIGHTS, f"other/{CONFIG}", f"other/{WEIGHTS}"])
    assert adapter_files(ours) == adapter_files(theirs) == expected
    for folder in (ours, ours / "other"):
        assert_same_adapter_file(folder, theirs / folder.relative_to(ours))


@pytest.mark.parametrize("direction", ["ours-to-hf", "hf-to-ours"])
@case_param(MULTI_CASES)
def test_multiple_adapters_cross_load(direction: str, case: Case, make_base, make_inputs, tmp_path: Path) -> None:
    """A 'default' and an 'other' adapter, saved by one library (other in a subfolder), loaded by the other."""
    build, load = (build_ours, load_with_hf) if direction == "ours-to-hf" else (build_hf, load_with_ours)
    inputs, names = make_inputs(case.kind), ["default", "other"]
    source = build(make_base(case.kind), case.lora, {"other": OTHER[case.kind]})
    expected = logits_per_adapter(source, inputs, names)
    assert_adapter_matters(expected["other"], expected["default"])
    source.save_pretrained(tmp_path / "source")
    assert (tmp_path / "source" / "other" / WEIGHTS).is_file()

    loaded = load(make_base(case.kind), tmp_path / "source", extra=("other",))
    for name, actual in logits_per_adapter(loaded, inputs, names).items():
        assert_same_logits(actual, expected[name])

    loaded.save_pretrained(tmp_path / "resaved")
    assert_same_adapter_dirs(tmp_path / "source", tmp_path / "resaved")


@case_param(MULTI_CASES)
def test_merge_two_adapters_matches_hf(case: Case, make_base, make_inputs, tmp_path: Path) -> None:
    """Merging two adapters that share a layer computes what both active adapters compute, as in HF."""
    inputs, names = make_inputs(case.kind), ["default", "other"]
    hf = build_hf(make_base(case.kind), case.lora, {"other": OTHER[case.kind]})
    hf.save_pretrained(tmp_path)
    ours = load_with_ours(make_base(case.kind), tmp_path, extra=("other",))
    default_only = logits(ours, inputs)
    if case.kind == "llama":  # no modules_to_save, whose copies cannot both be active
        ours.set_adapter(names)
        both = logits(ours, inputs)
        ours.set_adapter("default")

    hf_merged = hf.merge_and_unload(adapter_names=names)
    our_merged = ours.merge_and_unload(adapter_names=names)
    assert_adapter_matters(logits(our_merged, inputs), default_only)
    if case.kind == "llama":
        assert_same_logits(logits(hf_merged, inputs), both)
        assert_same_logits(logits(our_merged, inputs), both)
    assert_same_logits(logits(our_merged, inputs), logits(hf_merged, inputs))
    assert_same_state_dict(our_merged, hf_merged)


@pytest.mark.parametrize("order", [["default", "other"], ["other", "default"]], ids="-then-".join)
def test_two_active_adapters_match_hf(order: list[str], make_base, make_inputs, tmp_path: Path) -> None:
    """Both adapters active at once, a LoRA and a DoRA adapter on the same q_proj, in either order."""
    case, inputs = MULTI_CASES[0], make_inputs("llama")
    hf = build_hf(make_base("llama"), case.lora, {"other": OTHER["llama"]})
    hf.save_pretrained(tmp_path)
    ours = load_with_ours(make_base("llama"), tmp_path, extra=("other",))
    default_only = logits(ours, inputs)

    hf.base_model.set_adapter(order)
    ours.set_adapter(order)
    both = logits(ours, inputs)
    assert_adapter_matters(both, default_only)
    assert_same_logits(both, logits(hf, inputs))
