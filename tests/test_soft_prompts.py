"""Soft prompts (prompt tuning, P-tuning, prefix tuning) against Hugging Face PEFT, and in generation.

Hugging Face PEFT 0.21 is the oracle for forward outputs and saved files. For generated tokens the oracle
is greedy decoding with its *forward* pass: with the installed transformers, its own ``generate`` for
Llama prompt tuning and for prefix tuning disagrees with that forward pass (see
``test_generation_follows_hf_forward``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from peft_core import ConfigError, PeftError, PeftModel, get_peft_model
from peft_core.testing import tiny_model, train_steps
from peft_lora import LoraConfig
from peft_p_tuning import PromptEncoderConfig
from peft_prefix_tuning import PrefixTuningConfig
from peft_prompt_tuning import PromptTuningConfig
from torch import nn

VIRTUAL = 3
MODELS = {  # our name -> (tiny model kind, task type)
    "llama": ("llama", "CAUSAL_LM"),
    "gpt2": ("gpt2", "CAUSAL_LM"),
    "bert": ("bert-classifier", "SEQ_CLS"),
    "t5": ("t5", "SEQ_2_SEQ_LM"),
}
METHODS = {  # our name -> (HF config class, our config class, settings)
    "prompt": (peft.PromptTuningConfig, PromptTuningConfig, {}),
    "prompt-vocab": (peft.PromptTuningConfig, PromptTuningConfig, {"prompt_tuning_init": "SAMPLE_VOCAB"}),
    "p-tuning": (peft.PromptEncoderConfig, PromptEncoderConfig, {"encoder_hidden_size": 16}),
    "p-tuning-lstm": (peft.PromptEncoderConfig, PromptEncoderConfig, {"encoder_reparameterization_type": "LSTM"}),
    "prefix": (peft.PrefixTuningConfig, PrefixTuningConfig, {}),
    "prefix-projection": (peft.PrefixTuningConfig, PrefixTuningConfig, {"prefix_projection": True}),
}


@dataclass(frozen=True)
class Case:
    model: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return MODELS[self.model][0]

    @property
    def task(self) -> str:
        return MODELS[self.model][1]

    def hf_config(self) -> peft.PeftConfig:
        return METHODS[self.method][0](num_virtual_tokens=VIRTUAL, task_type=self.task, **METHODS[self.method][2])

    def our_config(self) -> Any:
        return METHODS[self.method][1](num_virtual_tokens=VIRTUAL, task_type=self.task, **METHODS[self.method][2])


# Prefix tuning needs a model that takes a key/value cache; transformers' BERT does not.
CASES = [Case(m, k) for m in MODELS for k in METHODS if not (m == "bert" and k.startswith("prefix"))]
GENERATING = [c for c in CASES if c.task != "SEQ_CLS"]


def case_param(cases: list[Case]) -> Any:
    return pytest.mark.parametrize("case", cases, ids=[f"{c.model}-{c.method}" for c in cases])


@pytest.fixture
def make(tiny_model_dir):
    return lambda kind: tiny_model(kind, tiny_model_dir(kind))


def call_inputs(case: Case) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 128, (2, 6), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0  # right padding in the second sample
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if case.task == "SEQ_CLS":
        inputs["labels"] = torch.tensor([0, 2])
    else:
        inputs["labels"] = input_ids.masked_fill(mask == 0, -100)
    return inputs


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits, out.loss


def real_positions(case: Case, model_logits: torch.Tensor) -> torch.Tensor:
    """The logits of the real tokens: prompt methods on a decoder-only model add virtual positions."""
    adds_positions = case.task == "CAUSAL_LM" and not case.method.startswith("prefix")
    return model_logits[:, VIRTUAL:] if adds_positions else model_logits


def assert_same_outputs(case: Case, ours: nn.Module, theirs: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    (our_logits, our_loss), (hf_logits, hf_loss) = outputs(ours, inputs), outputs(theirs, inputs)
    assert our_logits.shape == hf_logits.shape
    torch.testing.assert_close(real_positions(case, our_logits), real_positions(case, hf_logits), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_loss, hf_loss, atol=1e-5, rtol=1e-4)


def assert_prompt_matters(case: Case, adapted: nn.Module, base: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    adapted_logits = real_positions(case, outputs(adapted, inputs)[0])
    assert (adapted_logits - outputs(base, inputs)[0]).abs().max() > 1e-3


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path / "adapter_model.safetensors")


@case_param(CASES)
def test_hf_adapter_loads_in_ours_with_same_outputs(case: Case, make, tmp_path: Path) -> None:
    torch.manual_seed(1)
    peft.get_peft_model(make(case.kind), case.hf_config()).save_pretrained(tmp_path / "hf")
    theirs = peft.PeftModel.from_pretrained(make(case.kind), tmp_path / "hf").eval()
    ours = PeftModel.from_pretrained(make(case.kind), tmp_path / "hf")
    inputs = call_inputs(case)
    assert_prompt_matters(case, ours, make(case.kind), inputs)
    assert_same_outputs(case, ours, theirs, inputs)

    ours.save_pretrained(tmp_path / "ours")  # and back out: the same file
    assert saved_tensors(tmp_path / "ours").keys() == saved_tensors(tmp_path / "hf").keys()
    for key, tensor in saved_tensors(tmp_path / "hf").items():
        torch.testing.assert_close(saved_tensors(tmp_path / "ours")[key], tensor)


@case_param(CASES)
def test_our_trained_adapter_loads_in_hf_with_same_outputs(case: Case, make, tmp_path: Path) -> None:
    torch.manual_seed(2)
    ours = get_peft_model(make(case.kind), case.our_config())
    inputs = call_inputs(case)
    train_steps(ours, inputs, steps=2)
    ours.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    known = {f.name for f in __import__("dataclasses").fields(type(case.hf_config()))}
    assert sorted(set(saved) - known - {"peft_type"}) == [], "config keys HF does not know"
    theirs = peft.PeftModel.from_pretrained(make(case.kind), tmp_path).eval()
    assert_same_outputs(case, ours, theirs, inputs)


def test_saved_config_matches_hf_for_grouped_query_prefix(make, tmp_path: Path) -> None:
    """Llama with 2 key/value heads of 4: the prefix has the key/value shape, as HF records it."""
    case = Case("llama", "prefix-projection")
    get_peft_model(make("llama"), case.our_config()).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(make("llama"), case.hf_config()).save_pretrained(tmp_path / "hf")
    ours, hf = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "hf"))
    assert {k: v for k, v in ours.items() if hf.get(k) != v} == {}
    assert (ours["token_dim"], ours["num_attention_heads"], ours["encoder_hidden_size"]) == (32, 2, 32)
    assert saved_tensors(tmp_path / "ours")["prompt_embeddings"].shape == (VIRTUAL, 2 * 2 * 32)


# --- generation ------------------------------------------------------------------------------------------


def greedy_by_forward(model: nn.Module, case: Case, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence each step: no cache, no generate()."""
    with torch.no_grad():
        if case.task == "SEQ_2_SEQ_LM":
            decoded = torch.zeros(input_ids.shape[0], 1, dtype=torch.long)  # decoder_start_token_id
            for _ in range(steps):
                next_logits = model(input_ids=input_ids, decoder_input_ids=decoded).logits[:, -1]
                decoded = torch.cat([decoded, next_logits.argmax(-1, keepdim=True)], dim=1)
            return decoded
        sequence = input_ids
        for _ in range(steps):
            next_logits = model(input_ids=sequence).logits[:, -1]
            sequence = torch.cat([sequence, next_logits.argmax(-1, keepdim=True)], dim=1)
        return sequence


@case_param(GENERATING)
def test_generation_follows_hf_forward(case: Case, make, tmp_path: Path) -> None:
    torch.manual_seed(3)
    peft.get_peft_model(make(case.kind), case.hf_config()).save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(case.kind), tmp_path).eval()
    ours = PeftModel.from_pretrained(make(case.kind), tmp_path)
    input_ids = call_inputs(case)["input_ids"]
    expected = greedy_by_forward(theirs, case, input_ids, steps=6)

    settings = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
    cached = ours.generate(input_ids=input_ids, **settings)
    uncached = ours.generate(input_ids=input_ids, use_cache=False, **settings)
    torch.testing.assert_close(cached, expected, rtol=0, atol=0)
    torch.testing.assert_close(uncached, expected, rtol=0, atol=0)


@case_param([c for c in GENERATING if c.model == "llama"])
def test_left_padded_batch_generates_what_each_sample_does_alone(case: Case, make) -> None:
    torch.manual_seed(4)
    model = get_peft_model(make("llama"), case.our_config()).eval()
    long, short = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[9, 8, 7]])
    batch = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 9, 8, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(input_ids=batch, attention_mask=mask, **settings)
    assert torch.equal(together[0, 5:], model.generate(input_ids=long, **settings)[0, 5:])
    assert torch.equal(together[1, 5:], model.generate(input_ids=short, **settings)[0, 3:])


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_explicit_position_ids_mean_what_the_default_does(method: str, make) -> None:
    case = Case("llama", method)
    torch.manual_seed(5)
    model = get_peft_model(make("llama"), case.our_config()).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        implicit = model(input_ids=input_ids).logits
        explicit = model(input_ids=input_ids, position_ids=torch.arange(6)[None]).logits
    torch.testing.assert_close(explicit, implicit)


# --- training, composition, lifecycle ---------------------------------------------------------------------


def test_prefix_tuning_trains_a_llama_classifier_and_round_trips(make, tmp_path: Path) -> None:
    """HF PEFT 0.21 cannot feed this model a prefix with the installed transformers; ours can."""
    base = make("llama-classifier")
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=VIRTUAL, task_type="SEQ_CLS"))
    case = Case("bert", "prefix")  # the inputs of a classifier
    inputs = call_inputs(case)
    before = outputs(model, inputs)[0]
    with model.disable_adapter():
        torch.testing.assert_close(outputs(model, inputs)[0], outputs(make("llama-classifier"), inputs)[0])
    losses = train_steps(model, inputs, steps=8)
    assert losses[-1] < losses[0]
    after = outputs(model, inputs)[0]
    assert (after - before).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    assert {"prompt_embeddings", "base_model.score.weight"} <= saved_tensors(tmp_path).keys()
    loaded = PeftModel.from_pretrained(make("llama-classifier"), tmp_path)
    torch.testing.assert_close(outputs(loaded, inputs)[0], after)


def test_lora_and_prefix_tuning_train_and_save_together(make, llama_dir, tmp_path: Path) -> None:
    model = get_peft_model(make("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "lora")
    model.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=VIRTUAL, task_type="CAUSAL_LM"))
    model.set_adapter(["lora", "prefix"])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    input_ids = torch.randint(2, 128, (2, 8), generator=torch.Generator().manual_seed(6))
    losses = train_steps(model, input_ids, steps=6)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert any("lora_B" in n for n in changed) and any("peft_soft_prompts.prefix" in n for n in changed)
    assert all("lora_" in n or "peft_soft_prompts" in n for n in changed)

    expected = outputs(model, {"input_ids": input_ids, "labels": input_ids})
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "lora", adapter_name="lora")
    loaded.load_adapter(tmp_path / "prefix", adapter_name="prefix")
    loaded.set_adapter(["lora", "prefix"])
    actual = outputs(loaded, {"input_ids": input_ids, "labels": input_ids})
    torch.testing.assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1])
    tokens = model.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(loaded.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False,
                                               pad_token_id=0), tokens, rtol=0, atol=0)


def test_soft_prompt_refuses_to_merge_and_unloads_cleanly(make) -> None:
    base_logits = outputs(make("llama"), {"input_ids": torch.tensor([[5, 6, 7]])})[0]
    model = get_peft_model(make("llama"), PromptTuningConfig(num_virtual_tokens=VIRTUAL, task_type="CAUSAL_LM"))
    with pytest.raises(PeftError, match="soft prompt .*cannot be merged"):
        model.merge_adapter()
    with pytest.raises(PeftError, match=r"act on the model's inputs .*keep_unmergeable=True"):
        model.merge_and_unload()
    model.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    model.delete_adapter("other")
    assert list(model.base_model.model.peft_soft_prompts) == ["default"]
    unloaded = model.unload()
    assert not hasattr(unloaded, "peft_soft_prompts")
    torch.testing.assert_close(outputs(unloaded, {"input_ids": torch.tensor([[5, 6, 7]])})[0], base_logits)


def test_prefix_tuning_on_a_model_without_a_cache_names_the_class(make) -> None:
    with pytest.raises(ConfigError, match="BertForSequenceClassification.*key/value cache.*PromptTuningConfig"):
        get_peft_model(make("bert-classifier"), PrefixTuningConfig(num_virtual_tokens=VIRTUAL, task_type="SEQ_CLS"))


def test_prefix_tuning_refuses_gradient_checkpointing(make) -> None:
    base = make("llama")
    base.activation_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=VIRTUAL, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("config_class", [PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig])
@pytest.mark.parametrize("bad", [0, -2, None, 2.5])
def test_num_virtual_tokens_must_be_positive(config_class: type, bad: Any) -> None:
    # 2.5 fails the type check of every field, the others the method's own check
    with pytest.raises(ConfigError, match=r"num_virtual_tokens(, a positive integer| must be int or None, not float)"):
        config_class(num_virtual_tokens=bad)


def test_generation_from_several_threads_gives_each_its_own_result(make) -> None:
    import concurrent.futures

    torch.manual_seed(7)
    model = get_peft_model(make("llama"), Case("llama", "prefix").our_config()).eval()
    prompts = [torch.tensor([[5 + i, 6, 7, 8 + i]]) for i in range(6)]
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = [model.generate(input_ids=p, **settings) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(lambda p: model.generate(input_ids=p, **settings), prompts))
    for expected, actual in zip(alone, together, strict=True):
        assert torch.equal(actual, expected)
    assert model.unload()._forward_pre_hooks == {}  # the generation hook leaves with the adapters
