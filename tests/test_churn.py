"""Long-running servers: adapters loaded and deleted a thousand times leave nothing behind, and a thousand
merges and unmerges move the base weights by no more than float rounding."""

from __future__ import annotations

import collections
import gc
import os
import weakref

import pytest
import torch
from peft_adalora import AdaLoraConfig, update_and_allocate
from peft_core import AdapterLayer, PeftModel, get_peft_model, stack
from peft_core.testing import tiny_model
from peft_ia3 import IA3Config
from peft_ia3.layer import IA3Adapter
from peft_lora import LoraConfig
from peft_lora.layer import LoraAdapter
from peft_p_tuning import PromptEncoderConfig
from peft_prefix_tuning import PrefixTuningConfig
from peft_prompt_tuning import PromptTuningConfig
from torch import nn

CYCLES = 1000
# Two LoRA versions of one shape alternate, so a freed adapter's memory (and id) is likely reused by the
# next one: what was derived from the old one must not be taken for the new one's.
CHURNED = {
    "lora-v0": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora-v1": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "ia3": IA3Config(init_ia3_weights=False),
    "prompt": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}
INPUT_IDS = torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir) -> dict:
    """Adapters saved once: ``keep`` stays loaded throughout, the others come and go."""
    root = tmp_path_factory.mktemp("churn")
    configs = {"keep": LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), **CHURNED}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        get_peft_model(tiny_model("llama", tiny_model_dir("llama")), config).save_pretrained(root / name)
    return {name: root / name for name in configs}


def serving_model(llama_dir, saved: dict) -> PeftModel:
    return PeftModel.from_pretrained(tiny_model("llama", llama_dir), saved["keep"], adapter_name="keep")


def outputs(model: PeftModel, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixed batch with ``name`` and ``keep``, and ``name`` alone as the active adapter."""
    with torch.no_grad():
        mixed = model(input_ids=INPUT_IDS, adapter_names=[name, "keep"]).logits
        model.set_adapter(name)
        active = model(input_ids=INPUT_IDS).logits
        model.set_adapter("keep")
    return mixed, active


def resident_memory() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_objects() -> collections.Counter:
    """Live modules by class and live tensors, after a full collection."""
    gc.collect()
    counts = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: lazy module proxies warn when their attributes are read
        if issubclass(kind, nn.Module):
            counts[kind.__qualname__] += 1
        elif issubclass(kind, torch.Tensor):
            counts["tensors"] += 1
    return counts


def footprint(model: PeftModel) -> dict:
    """Everything adapters add to a model or keep about themselves, as comparable values."""
    hooks = {}
    for name, module in model.named_modules():
        counts = tuple(len(getattr(module, attribute)) for attribute in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
            "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
        ))
        if any(counts):
            hooks[name] = counts
    layers = {
        name: (list(m.adapters), m.active_adapters, m.merged_adapters, list(m._mixed_groups), list(m._mixed_caches))
        for name, m in model.named_modules() if isinstance(m, AdapterLayer)
    }
    return {
        "parameters": [(n, p.data_ptr()) for n, p in model.named_parameters()],
        "buffers": [n for n, _ in model.named_buffers()],
        "modules": [(n, type(m).__qualname__) for n, m in model.named_modules()],
        "hooks": hooks,
        "adapter layers": layers,
        "peft_config": list(model.peft_config),
        "internal": (list(model._methods), list(model._injected), model.active_adapters, model._merged),
    }


def test_a_thousand_loads_and_deletes_leave_memory_flat_and_nothing_behind(llama_dir, saved):
    fresh = {}
    for name in CHURNED:
        reference = serving_model(llama_dir, saved)
        reference.load_adapter(saved[name], name)
        fresh[name] = outputs(reference, name)
    model = serving_model(llama_dir, saved)
    names = list(CHURNED)

    def cycle(i: int) -> None:
        kind = names[i % len(names)]
        adapter_name = f"{kind}-{i}"  # a new name every time: nothing may be kept by name either
        model.load_adapter(saved[kind], adapter_name)
        with torch.no_grad():
            mixed = model(input_ids=INPUT_IDS, adapter_names=[adapter_name, "keep"]).logits
        assert torch.equal(mixed, fresh[kind][0]), (i, kind)
        model.delete_adapter(adapter_name)

    warm_up = 40
    for i in range(warm_up):
        cycle(i)
    memory, objects, before = resident_memory(), live_objects(), footprint(model)
    for i in range(warm_up, CYCLES):
        cycle(i)
    growth = resident_memory() / memory - 1
    assert growth < 0.05, f"resident memory grew by {growth:.1%}"
    after = live_objects()
    assert after["tensors"] <= objects.pop("tensors")
    assert {kind: n for kind, n in after.items() if kind != "tensors"} == dict(objects)
    assert footprint(model) == before
    assert footprint(model)["hooks"] == footprint(serving_model(llama_dir, saved))["hooks"]

    last = names[(CYCLES - 1) % len(names)]
    model.load_adapter(saved[last], last)
    for actual, expected in zip(outputs(model, last), fresh[last], strict=True):
        assert torch.equal(actual, expected)


def test_deleting_an_adapter_drops_what_mixed_batches_derived_from_it(llama_dir, saved):
    model = serving_model(llama_dir, saved)
    model.load_adapter(saved["lora-v0"], "x")
    with torch.no_grad():
        model(input_ids=INPUT_IDS, adapter_names=["x", "keep"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    deleted = weakref.ref(layer.adapters["x"])
    assert layer._mixed_caches  # LoRA stacked both adapters' factors, copies that hold memory
    model.delete_adapter("x")
    gc.collect()
    assert list(layer.adapters) == ["keep"]
    assert layer._mixed_caches == {} and deleted() is None


# Every method, trained a step (AdaLoRA: its penalty in the loss and an allocation) between adding and deleting.
EVERY_METHOD = {
    "lora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "ia3": lambda: IA3Config(init_ia3_weights=False),
    "adalora": lambda: AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=60,
                                     tinit=1, tfinal=1, deltaT=1),
    "prompt-tuning": lambda: PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix-tuning": lambda: PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "p-tuning": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_adding_training_and_deleting_each_method_leaves_nothing_behind(llama_dir, saved, method):
    model = serving_model(llama_dir, saved)
    base = model.get_base_model()
    before, base_state = footprint(model), set(base.__dict__)
    deleted = []
    for i in range(30):
        name = f"{method}-{i}"
        model.add_adapter(name, EVERY_METHOD[method]())
        model.set_adapter(name)
        model.train()
        model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
        if method == "adalora":
            update_and_allocate(model, i)
        deleted += [weakref.ref(m.adapters[name]) for m in model.modules() if isinstance(m, AdapterLayer)
                    and name in m.adapters]
        deleted += [weakref.ref(prompt) for prompt in getattr(base, "peft_soft_prompts", {}).values()]
        model.set_adapter("keep")
        model.eval()
        model.zero_grad(set_to_none=True)
        model.delete_adapter(name)
    gc.collect()
    assert footprint(model) == before
    assert set(base.__dict__) == base_state  # no hook handle, allocator table or other bookkeeping left
    assert deleted and all(ref() is None for ref in deleted)  # nothing holds a deleted adapter's modules


def test_a_deleted_adalora_adapter_leaves_no_hook_and_no_allocator(llama_dir):
    model = get_peft_model(tiny_model("llama", llama_dir), LoraConfig(r=2, target_modules=["o_proj"]))
    base = model.get_base_model()
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()]
    model.add_adapter("ada", EVERY_METHOD["adalora"]())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    adapter = weakref.ref(layer.adapters["ada"])
    model.delete_adapter("ada")
    gc.collect()
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()] == hooks
    assert "_adalora_allocators" not in base.__dict__
    assert adapter() is None  # nothing (an allocator) holds the deleted adapter's modules


# --- merge and unmerge drift -------------------------------------------------------------------------

# Float32 rounds each result to the nearest float, within a relative error of EPS (the unit roundoff).
# A merge or an unmerge rounds each weight element once. LoRA adds the same delta d and subtracts it:
#   W' = fl(fl(W + d) - d) = W + (W + d)·δ1·(1 + δ2) + W·δ2,  |δi| <= EPS,
# so one cycle moves an element by at most ((1 + EPS)^2 - 1)·(|W| + |d|). IA3 multiplies by l and divides:
#   W' = fl(fl(W·l) / l) = W·(1 + δ1)(1 + δ2),
# the same bound with d = 0, whatever l is (barring overflow and underflow). LoRA then an IA3 scaling the
# output rounds four times a cycle, W' = (W + (W + d)θ)(1 + δ4) with |θ| <= (1 + EPS)^3 - 1, so the bound
# is ((1 + EPS)^4 - 1)·(|W| + |d|). With m roundings a cycle, e_k = |W_k - W_0| grows at most as
# e_{k+1} <= e_k + ((1 + EPS)^m - 1)·(|W_0| + e_k + |d|), hence after n cycles
#   |W_n - W_0| <= ((1 + EPS)^(m·n) - 1)·(|W_0| + |d|)  ~=  m·n·EPS·(|W_0| + |d|),
# about 1.2e-4 relative for LoRA or IA3 after 1,000 cycles, 2.4e-4 for the stack.
# An IA3 scaling the input (feedforward_modules) merges beneath LoRA: merging it unmerges LoRA, scales and
# merges LoRA again, and unmerging it does the reverse, so a cycle rounds 8 times, and what is rounded on
# the scaled weight W·l + d (errors up to EPS·(|W·l| + |d|)) is divided by l when unscaled. Each rounding
# then errs by at most EPS·(|W| + |d| + |d / l|), and the bound is ((1 + EPS)^(8·n) - 1)·(|W_0| + |d| + |d / l|).
EPS = 2.0**-24
TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


def ia3() -> IA3Config:
    return IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], init_ia3_weights=False)


def drift_bound(layer: AdapterLayer, w0: torch.Tensor, cycles: int) -> torch.Tensor:
    """The bound derived above for this layer's adapters: LoRA, IA3, or one of each."""
    loras = [a for a in layer.adapters.values() if isinstance(a, LoraAdapter)]
    scales = [a for a in layer.adapters.values() if isinstance(a, IA3Adapter)]
    delta = sum((a.delta_weight().detach().abs() for a in loras), torch.zeros_like(w0))
    roundings, size = 2 * len(layer.adapters), w0.abs() + delta  # a merge and an unmerge per adapter
    if loras and scales and scales[0].acts_on == "input":
        roundings, size = 8, size + delta / scales[0].ia3_l.detach().abs()  # (1, in): scales columns
    return ((1 + EPS) ** (roundings * cycles) - 1) * size


@pytest.mark.parametrize("config", [lora, ia3, lambda: stack([lora(), ia3()])], ids=["lora", "ia3", "lora+ia3"])
def test_a_thousand_merges_and_unmerges_drift_by_float_rounding_only(llama_dir, config):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", llama_dir), config()).eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}
    assert len(layers) == 2 * len(TARGETS)
    original = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    with torch.no_grad():
        adapted = model(input_ids=INPUT_IDS).logits
    for _ in range(CYCLES):
        model.merge_adapter()
        model.unmerge_adapter()
    for name, layer in layers.items():
        drift = (layer.base_layer.weight.detach() - original[name]).abs()
        bound = drift_bound(layer, original[name], CYCLES)
        assert (drift <= bound).all(), f"{name}: drift {(drift / bound).max():.2f} times the bound"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, adapted, rtol=1e-4, atol=1e-4)
