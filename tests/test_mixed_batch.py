"""Mixed batches: ``adapter_names`` gives each sample its own adapter (or none), in forward and generate."""

from __future__ import annotations

import concurrent.futures
import itertools
import random

import peft
import pytest
import torch
from peft_core import PeftError, PeftModel, get_peft_model
from peft_core.testing import tiny_model
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from peft_lora.layer import LoraLinear
from peft_p_tuning import PromptEncoderConfig
from peft_prefix_tuning import PrefixTuningConfig
from peft_prompt_tuning import PromptTuningConfig

ADAPTERS = {
    "lora-a": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora-b": LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    "dora": LoraConfig(r=2, target_modules=["k_proj"], use_dora=True, init_lora_weights=False),
    "ia3": IA3Config(init_ia3_weights=False),
    "prompt": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix": PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
    "p-tuning": PromptEncoderConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"),
}
NAMES = ["lora-a", "__base__", "lora-b", "ia3", "prompt", "prefix", "p-tuning", "dora", "lora-a"]


@pytest.fixture
def served(llama):
    torch.manual_seed(0)
    names = iter(ADAPTERS)
    first = next(names)
    model = get_peft_model(llama, ADAPTERS[first], first)
    for name in names:
        model.add_adapter(name, ADAPTERS[name])
    return model.eval()


def batch(seed: int = 1, size: int = len(NAMES)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 128, (size, 6), generator=generator)
    mask = torch.ones_like(input_ids)
    for row in range(1, size, 3):
        mask[row, : 1 + row % 2] = 0  # left padding
    return input_ids, mask


def alone(model: PeftModel, name: str, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run one sample with its adapter active, as a batch of one."""
    if name == "__base__":
        with model.disable_adapter():
            return alone_active(model, input_ids, **kwargs)
    model.set_adapter(name)
    return alone_active(model, input_ids, **kwargs)


def alone_active(model, input_ids, generate=None, **kwargs):
    with torch.no_grad():
        if generate:
            return model.generate(input_ids=input_ids, **generate)
        return model(input_ids=input_ids).logits


def test_each_sample_computes_what_it_computes_alone(served):
    input_ids, mask = batch()
    with torch.no_grad():
        mixed = served(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits
    for row, name in enumerate(NAMES):
        real = input_ids[row : row + 1, mask[row].bool()]
        expected = alone(served, name, real)[:, -real.shape[1] :]
        actual = mixed[row : row + 1, -6:][:, mask[row].bool()]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_different_adapters_give_different_outputs(served):
    """The check above could pass with every adapter ignored: make sure they matter."""
    input_ids = batch()[0][:1].expand(3, -1)
    with torch.no_grad():
        logits = served(input_ids=input_ids, adapter_names=["lora-a", "lora-b", "__base__"]).logits
    assert (logits[0] - logits[1]).abs().max() > 1e-2
    assert (logits[0] - logits[2]).abs().max() > 1e-2


def test_generation_gives_each_sample_its_own_tokens(served):
    input_ids, mask = batch(seed=2)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    together = served.generate(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES, **settings)
    for row, name in enumerate(NAMES):
        real = input_ids[row : row + 1, mask[row].bool()]
        expected = alone(served, name, real, generate=settings)[0, real.shape[1] :]
        assert torch.equal(together[row, 6:], expected), name


def test_several_sequences_per_prompt_keep_their_adapter(served):
    input_ids = batch(seed=3, size=3)[0]
    names = ["lora-b", "prefix", "__base__"]
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    together = served.generate(input_ids=input_ids, adapter_names=names, **settings)
    for row, name in enumerate(names):
        expected = alone(served, name, input_ids[row : row + 1], generate=settings)
        assert torch.equal(together[2 * row : 2 * row + 2], expected), name


def test_lora_samples_are_computed_in_one_batched_product(served, monkeypatch):
    def per_adapter_forward(*args, **kwargs):
        raise AssertionError("a mixed batch ran a LoRA adapter on its own")

    monkeypatch.setattr(LoraLinear, "forward", per_adapter_forward)
    with torch.no_grad():
        served(input_ids=batch()[0][:3], adapter_names=["lora-a", "lora-b", "__base__"])


def test_matches_hf_peft_adapter_names(llama_dir, tmp_path):
    settings = dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama", llama_dir), peft.LoraConfig(**settings), "one")
    theirs.add_adapter("two", peft.LoraConfig(**{**settings, "r": 6}))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "one", adapter_name="one")
    ours.load_adapter(tmp_path / "two", adapter_name="two")
    input_ids, names = batch()[0][:4], ["two", "one", "__base__", "two"]
    with torch.no_grad():
        expected = theirs.eval()(input_ids=input_ids, adapter_names=names).logits
        actual = ours(input_ids=input_ids, adapter_names=names).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_threads_with_their_own_assignments_do_not_meet(served):
    names = [n for n in ADAPTERS if n != "dora"] + ["__base__"]
    rng = random.Random(0)
    requests = [(batch(seed=10 + i, size=3)[0], [rng.choice(names) for _ in range(3)]) for i in range(16)]

    def serve(request):
        input_ids, adapter_names = request
        with torch.no_grad():
            return served(input_ids=input_ids, adapter_names=adapter_names).logits

    one_by_one = [serve(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(serve, requests))
    for expected, actual in zip(one_by_one, together, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("names", "message"), [
    (["lora-a"], "1 names for a batch of 2"),
    (["lora-a", "nope"], r"no adapter named \['nope'\]"),
    ("lora-a", "one adapter name per sample"),
])
def test_bad_adapter_names_are_refused(served, names, message):
    with pytest.raises(PeftError, match=message):
        served(input_ids=batch()[0][:2], adapter_names=names)


def test_mixed_batches_are_for_inference_and_unmerged_adapters(served):
    input_ids = batch()[0][:2]
    served.train()
    with pytest.raises(PeftError, match="for inference: call model.eval"):
        served(input_ids=input_ids, adapter_names=["lora-a", "ia3"])
    served.eval()
    served.merge_adapter(["lora-b"])
    with pytest.raises(PeftError, match=r"\['lora-b'\] are merged"):
        served(input_ids=input_ids, adapter_names=["lora-a", "ia3"])


def test_switching_between_adapters_of_every_method_never_touches_the_base(served, tmp_path):
    input_ids = batch()[0][:2]
    base = {n: (p.data_ptr(), p.detach().clone()) for n, p in served.named_parameters()
            if ".adapters." not in n and "peft_soft_prompts" not in n}
    seen = {}
    for name in ADAPTERS:
        served.set_adapter(name)
        seen[name] = alone_active(served, input_ids)[:, -6:]  # the real tokens' logits
    served.save_pretrained(tmp_path, selected_adapters=["prefix", "ia3"])
    served.delete_adapter("prefix")
    served.load_adapter(tmp_path / "prefix", adapter_name="prefix")
    served.set_adapter("prefix")
    torch.testing.assert_close(alone_active(served, input_ids)[:, -6:], seen["prefix"])
    with served.disable_adapter():
        plain = alone_active(served, input_ids)
    assert all((seen[a] - seen[b]).abs().max() > 1e-4 for a, b in itertools.pairwise(ADAPTERS))
    for name, param in served.named_parameters():
        if name in base:
            assert param.data_ptr() == base[name][0] and torch.equal(param, base[name][1]), name
    served.set_adapter("lora-a")
    torch.testing.assert_close(alone_active(served, input_ids), seen["lora-a"])
    assert (plain - seen["lora-a"]).abs().max() > 1e-4
