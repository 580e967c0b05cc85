"""``add_weighted_adapter`` for LoRA against Hugging Face PEFT: the same call gives the same adapter.

Source adapters are created once by HF ``peft`` with random A and B (``init_lora_weights=False``), saved, and
loaded into both libraries, so both start from identical weights. Each comparison runs the same call in both
after the same ``torch.manual_seed`` and checks the new adapter's tensors, the logits with it active (which it
must change) and the random number stream after the call (so DARE draws what HF draws).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft_core import ConfigError, PeftModel, get_peft_model
from peft_core.testing import tiny_model
from peft_core.testing.models import TinyConvNet
from peft_lora import LoraConfig
from peft_lora.weighted import majority_sign_mask, merge_tensors, prune_at_random, prune_by_magnitude
from safetensors.torch import load_file
from torch import nn

ATOL = RTOL = 1e-5
SEED = 3
WEIGHTS = [0.7, -0.4, 1.2]
# What HF peft warns when a file does not fit: unknown config keys, missing or unexpected weights.
PROBLEM_MARKERS = ("unexpected", "missing", "mismatch", "ignoring", "does not support")


# Adapter sets by name: (model kind, {adapter name: HF LoraConfig arguments}), the first adapter first.
ADAPTER_SETS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    # One rank (the factor-wise types need it), overlapping targets, an embedding, rsLoRA.
    "equal": ("llama", {
        "one": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "two": dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True),
        "three": dict(r=4, lora_alpha=16, target_modules=["q_proj", "embed_tokens"]),
    }),
    # Ranks 4, 2 and 6 (3 on q_proj): layers where the new rank is larger than what the sources fill.
    "mixed": ("llama", {
        "one": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "two": dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"]),
        "three": dict(r=6, lora_alpha=6, target_modules=["q_proj", "embed_tokens"], rank_pattern={"q_proj": 3}),
    }),
    # The new adapter takes use_rslora from the first: its scaling is sqrt(r), as in HF.
    "rslora": ("llama", {
        "one": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "two": dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
    }),
    "dora": ("llama", {
        "one": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
        "two": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], use_dora=True),
    }),
    # Conv1D stores weights (in, out): SVD and DARE work in that layout.
    "gpt2": ("gpt2", {
        "one": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        "two": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        "three": dict(r=4, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True, use_rslora=True),
    }),
    "conv": ("conv", {
        "one": dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "conv3"]),
        "two": dict(r=2, lora_alpha=2, target_modules=["conv1", "conv3"]),
        "three": dict(r=2, lora_alpha=8, target_modules=["conv2"]),
    }),
    "regex": ("llama", {
        "one": dict(r=4, target_modules=r".*\.0\.self_attn\.(q_proj|v_proj)"),
        "two": dict(r=2, lora_alpha=4, target_modules=r".*\.mlp\.down_proj"),
    }),
}


# --- helpers -----------------------------------------------------------------------------------------


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module")
def make_base(tiny_model_dir) -> Callable[[str], nn.Module]:
    def make(kind: str) -> nn.Module:
        if kind == "conv":
            torch.manual_seed(0)
            return TinyConvNet().eval()
        return tiny_model(kind, tiny_model_dir(kind))

    return make


@pytest.fixture(scope="module")
def saved_sets(make_base, tmp_path_factory) -> Callable[[str], Path]:
    """``saved_sets(name)``: the directory where HF saved that adapter set (one subfolder per adapter)."""
    root, done = tmp_path_factory.mktemp("adapter_sets"), {}

    def saved(name: str) -> Path:
        if name not in done:
            kind, settings = ADAPTER_SETS[name]
            first, *others = settings
            torch.manual_seed(0)
            config = peft.LoraConfig(init_lora_weights=False, **settings[first])
            model = peft.get_peft_model(make_base(kind), config, adapter_name=first)
            for other in others:
                model.add_adapter(other, peft.LoraConfig(init_lora_weights=False, **settings[other]))
            model.save_pretrained(root / name)
            done[name] = root / name
        return done[name]

    return saved


@pytest.fixture
def inputs_for(input_ids) -> Callable[[str], dict[str, torch.Tensor]]:
    def inputs(kind: str) -> dict[str, torch.Tensor]:
        if kind == "conv":
            return {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
        return {"input_ids": input_ids}

    return inputs


def load_both(saved_sets, make_base, set_name: str, base: Callable[[], nn.Module] | None = None):
    """(HF's model, ours), each with the set's adapters loaded from HF's files."""
    kind, settings = ADAPTER_SETS[set_name]
    path, (first, *others) = saved_sets(set_name), list(settings)
    base = base or (lambda: make_base(kind))
    hf = peft.PeftModel.from_pretrained(base(), path / first, adapter_name=first)
    ours = PeftModel.from_pretrained(base(), path / first, adapter_name=first)
    for other in others:
        hf.load_adapter(path / other, adapter_name=other)
        ours.load_adapter(path / other, adapter_name=other)
    return hf.eval(), ours.eval()


def combine_in_both(hf, ours, combination_type: str, weights: list[float] | None = None, **options: Any) -> None:
    """The same call in both libraries after the same seed; both leave the generator in the same state."""
    adapters = list(ours.peft_config)
    weights = weights or WEIGHTS[: len(adapters)]
    torch.manual_seed(SEED)
    hf.add_weighted_adapter(adapters, weights, "new", combination_type=combination_type, **options)
    hf_next = torch.rand(4)
    torch.manual_seed(SEED)
    ours.add_weighted_adapter(adapters, weights, "new", combination_type=combination_type, **options)
    torch.testing.assert_close(torch.rand(4), hf_next, atol=0, rtol=0, msg="random stream after the call")


def new_adapter_tensors(hf, ours, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The new adapter's LoRA tensors by saved key: HF's state dict and what we save."""
    theirs = {k: v for k, v in peft.get_peft_model_state_dict(hf, adapter_name="new").items() if "lora_" in k}
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["new"])
    return theirs, load_file(tmp_path / "ours" / "new" / "adapter_model.safetensors")


def products(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B @ A per layer (factors flattened): an SVD's factors are defined only up to signs."""
    found = {}
    for key, lora_a in tensors.items():
        if key.endswith("lora_A.weight"):
            lora_b = tensors[key.replace("lora_A", "lora_B")]
            found[key] = lora_b.flatten(1) @ lora_a.flatten(1)
    return found


def assert_same_new_adapter(hf, ours, inputs, tmp_path: Path, factors_exact: bool = True) -> None:
    theirs, mine = new_adapter_tensors(hf, ours, tmp_path)
    assert sorted(mine) == sorted(theirs)
    if not factors_exact:
        theirs, mine = products(theirs), products(mine)
    for key, tensor in mine.items():
        torch.testing.assert_close(tensor, theirs[key], atol=ATOL, rtol=RTOL, msg=lambda m, key=key: f"{key}: {m}")
    with hf.disable_adapter():
        base = logits(hf, inputs)
    hf.set_adapter("new")
    ours.set_adapter("new")
    expected = logits(hf, inputs)
    assert (expected - base).abs().max() > 1e-3, "the combined adapter barely changes the logits"
    torch.testing.assert_close(logits(ours, inputs), expected, atol=ATOL, rtol=RTOL)


def holds_adapter(model: PeftModel, name: str) -> bool:
    return name in model.peft_config or any(name in getattr(m, "adapters", {}) for m in model.modules())


# --- the same adapter as Hugging Face PEFT ----------------------------------------------------------------

PRUNING = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
ALL_TYPES = ["linear", "cat", "svd", *PRUNING, *(f"{t}_svd" for t in PRUNING)]
# Options per type for the "equal" set: every option appears with a non-default value somewhere.
OPTIONS = {
    "svd": dict(svd_rank=5, svd_clamp=0.9),
    "ties": dict(density=0.5),
    "dare_linear": dict(density=0.6),
    "dare_ties": dict(density=0.6, majority_sign_method="frequency"),
    "magnitude_prune": dict(density=0.3),
    "ties_svd": dict(density=0.5, svd_rank=3, majority_sign_method="frequency"),
    "dare_linear_svd": dict(density=0.4, svd_full_matrices=False),
    "dare_ties_svd": dict(density=0.5),
    "magnitude_prune_svd": dict(density=0.5, svd_clamp=0.5),
}


@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_every_combination_type_matches_hf(combination_type, saved_sets, make_base, inputs_for, tmp_path):
    hf, ours = load_both(saved_sets, make_base, "equal")
    combine_in_both(hf, ours, combination_type, **OPTIONS.get(combination_type, {}))
    assert_same_new_adapter(hf, ours, inputs_for("llama"), tmp_path)


@pytest.mark.parametrize(("combination_type", "options"), [
    ("cat", {}), ("svd", {}), ("svd", dict(svd_rank=9)), ("dare_ties_svd", dict(density=0.7)),
    ("magnitude_prune_svd", dict(density=0.4)),
])
def test_different_ranks_match_hf(combination_type, options, saved_sets, make_base, inputs_for, tmp_path):
    hf, ours = load_both(saved_sets, make_base, "mixed")
    combine_in_both(hf, ours, combination_type, **options)
    expected_rank = {"cat": 4 + 2 + 6}.get(combination_type, options.get("svd_rank", 6))
    assert ours.peft_config["new"].r == ours.peft_config["new"].lora_alpha == expected_rank
    assert_same_new_adapter(hf, ours, inputs_for("llama"), tmp_path)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "dare_linear_svd", "dare_ties"])
def test_gpt2_conv1d_matches_hf(combination_type, saved_sets, make_base, inputs_for, tmp_path):
    hf, ours = load_both(saved_sets, make_base, "gpt2")
    combine_in_both(hf, ours, combination_type, **({"density": 0.5} if "dare" in combination_type else {}))
    assert_same_new_adapter(hf, ours, inputs_for("gpt2"), tmp_path)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "dare_linear", "ties_svd", "magnitude_prune"])
def test_conv2d_matches_hf(combination_type, saved_sets, make_base, inputs_for, tmp_path):
    hf, ours = load_both(saved_sets, make_base, "conv")
    combine_in_both(hf, ours, combination_type, **({} if combination_type in ("cat", "svd") else {"density": 0.5}))
    # Our Conv2d update is an einsum, HF's a convolution: equal to float rounding, so SVD signs may differ.
    assert_same_new_adapter(hf, ours, inputs_for("conv"), tmp_path, factors_exact=False)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
@pytest.mark.parametrize("set_name", ["dora", "rslora"])
def test_dora_and_rslora_adapters_match_hf(set_name, combination_type, saved_sets, make_base, inputs_for, tmp_path):
    hf, ours = load_both(saved_sets, make_base, set_name)
    combine_in_both(hf, ours, combination_type)
    config = ours.peft_config["new"]
    assert config.use_dora if set_name == "dora" else config.use_rslora
    assert_same_new_adapter(hf, ours, inputs_for("llama"), tmp_path)


def test_regex_targets_are_joined_as_hf_joins_them(saved_sets, make_base, inputs_for, tmp_path):
    hf, ours = load_both(saved_sets, make_base, "regex")
    combine_in_both(hf, ours, "cat")
    assert ours.peft_config["new"].target_modules == hf.peft_config["new"].target_modules
    assert ours.peft_config["new"].target_modules == r"(.*\.0\.self_attn\.(q_proj|v_proj))|(.*\.mlp\.down_proj)"
    assert_same_new_adapter(hf, ours, inputs_for("llama"), tmp_path)


@pytest.mark.parametrize(("set_name", "adapter", "rank"), [("equal", "two", 4), ("mixed", "three", 6)])
def test_one_adapter_is_scaled_linearly_as_in_hf(set_name, adapter, rank, saved_sets, make_base, inputs_for, tmp_path):
    """With 'mixed', adapter 'three' has rank 3 on q_proj: HF shrinks that layer's new factors to rank 3, we keep
    rank 6 with zeros, so there the products and outputs are compared, not the factors."""
    hf, ours = load_both(saved_sets, make_base, set_name)
    torch.manual_seed(SEED)
    hf.add_weighted_adapter([adapter], [-1.5], "new", combination_type="svd")
    with pytest.warns(UserWarning, match="one adapter: combining it linearly"):
        ours.add_weighted_adapter([adapter], [-1.5], "new", combination_type="svd")
    assert ours.peft_config["new"].r == rank  # the adapter's largest rank, not an SVD's
    assert_same_new_adapter(hf, ours, inputs_for("llama"), tmp_path, factors_exact=set_name == "equal")


@pytest.mark.parametrize("first_targets", ["all-linear", None])
def test_targets_are_the_union_hf_computes(first_targets, make_base):
    """``None`` (the model type's default) and ``"all-linear"`` join the union as the names they stand for."""
    hf = peft.get_peft_model(make_base("llama"), peft.LoraConfig(r=4, target_modules=first_targets))
    ours = get_peft_model(make_base("llama"), LoraConfig(r=4, target_modules=first_targets))
    hf.add_adapter("other", peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    ours.add_adapter("other", LoraConfig(r=4, target_modules=["embed_tokens"]))
    hf.add_weighted_adapter(["default", "other"], [1.0, 1.0], "new", combination_type="cat")
    ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "new", combination_type="cat")
    assert ours.peft_config["new"].target_modules == sorted(hf.peft_config["new"].target_modules)

    def adapted(model: nn.Module) -> list[str]:
        return sorted(
            name.split(".lora_")[0].removesuffix(".adapters.new") for name, _ in model.named_parameters()
            if "new" in name.split(".") and ("lora_A" in name or "lora_embedding_A" in name)
        )

    assert adapted(ours) == adapted(hf) and len(adapted(ours)) > 2


def test_new_config_is_the_first_adapters_with_new_rank_and_targets(llama):
    model = get_peft_model(llama, LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj"], lora_dropout=0.1, use_rslora=True, bias="lora_only",
        rank_pattern={"q_proj": 6}, alpha_pattern={"q_proj": 2}, init_lora_weights="pissa",
    ))
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.add_adapter("other", LoraConfig(r=2, target_modules=["o_proj"]))
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "new", combination_type="cat")
    config = model.peft_config["new"]
    assert (config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern) == (8, 8, {}, {})
    assert config.target_modules == ["o_proj", "q_proj"]
    assert (config.lora_dropout, config.use_rslora, config.bias) == (0.1, True, "lora_only")
    # A PiSSA config would refactor the (already residual) base weights; the new adapter starts plainly.
    assert config.init_lora_weights is True
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())
    assert not any(p.requires_grad for n, p in after.items() if ".new." in n)  # inactive, so frozen


# --- quantized bases ----------------------------------------------------------------------------------


def bnb_4bit(directory: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config).eval()


@pytest.mark.parametrize("combination_type", ["cat", "dare_ties"])
def test_on_a_4bit_base_matches_hf(combination_type, saved_sets, make_base, llama_dir, inputs_for, tmp_path):
    import bitsandbytes as bnb

    hf, ours = load_both(saved_sets, make_base, "equal", base=lambda: bnb_4bit(llama_dir))
    assert isinstance(ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    combine_in_both(hf, ours, combination_type, **({"density": 0.5} if combination_type == "dare_ties" else {}))
    assert_same_new_adapter(hf, ours, inputs_for("llama"), tmp_path)


def test_qlora_config_combines_on_its_quantized_base(llama, input_ids):
    import bitsandbytes as bnb
    from peft_qlora import QLoraConfig

    first = QLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(llama, first)
    model.add_adapter("other", QLoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                           init_lora_weights=False))
    model.eval()
    model.set_adapter(["default", "other"])
    both = logits(model, {"input_ids": input_ids})
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "cat", combination_type="cat")
    assert isinstance(model.peft_config["cat"], QLoraConfig) and model.peft_config["cat"].r == 6
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and "cat" in layer.adapters
    model.set_adapter("cat")  # cat with weights 1 is exactly both adapters at once
    torch.testing.assert_close(logits(model, {"input_ids": input_ids}), both, atol=1e-4, rtol=1e-4)


# --- saving and reloading -------------------------------------------------------------------------------


@pytest.mark.parametrize(("combination_type", "options"), [("cat", {}), ("svd", dict(svd_rank=64))])
def test_combined_adapter_reloads_with_the_same_outputs_in_both_libraries(
    combination_type, options, saved_sets, make_base, inputs_for, tmp_path,
):
    """Saved, the combined adapter is an ordinary LoRA adapter; ranks a layer does not fill are saved as zeros
    (rank 64 is more than k_proj's 32 outputs, and ``cat`` gives q_proj rank 12 of which 'three' fills 3)."""
    inputs = inputs_for("llama")
    _, ours = load_both(saved_sets, make_base, "mixed")
    ours.add_weighted_adapter(["one", "two", "three"], WEIGHTS, "new", combination_type=combination_type, **options)
    ours.set_adapter("new")
    expected = logits(ours, inputs)
    ours.save_pretrained(tmp_path, selected_adapters=["new"])

    reloaded = PeftModel.from_pretrained(make_base("llama"), tmp_path / "new").eval()
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=ATOL, rtol=RTOL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(make_base("llama"), tmp_path / "new").eval()
    problems = [str(w.message) for w in caught if any(m in str(w.message).lower() for m in PROBLEM_MARKERS)]
    assert problems == [], "HF warned loading our combined adapter"
    torch.testing.assert_close(logits(theirs, inputs), expected, atol=ATOL, rtol=RTOL)


def test_full_rank_svd_is_exact(saved_sets, make_base, inputs_for):
    """An SVD keeping every singular value reproduces the weighted sum, as ``cat`` does exactly."""
    inputs = inputs_for("llama")
    _, ours = load_both(saved_sets, make_base, "mixed")
    ours.add_weighted_adapter(["one", "two", "three"], WEIGHTS, "cat", combination_type="cat")
    ours.add_weighted_adapter(["one", "two", "three"], WEIGHTS, "svd", combination_type="svd", svd_rank=64)
    ours.add_weighted_adapter(["one", "two", "three"], WEIGHTS, "svd2", combination_type="svd", svd_rank=2)
    outputs = {}
    for name in ("cat", "svd", "svd2"):
        ours.set_adapter(name)
        outputs[name] = logits(ours, inputs)
    torch.testing.assert_close(outputs["svd"], outputs["cat"], atol=1e-5, rtol=1e-5)
    assert (outputs["svd2"] - outputs["cat"]).abs().max() > 1e-4  # truncation does change the update


# --- the merges ------------------------------------------------------------------------------------------


def test_magnitude_pruning_keeps_the_largest_entries():
    tensor = torch.tensor([[0.5, -3.0, 1.0], [-0.1, 2.0, -0.7]])
    expected = torch.tensor([[0.0, -3.0, 1.0], [0.0, 2.0, 0.0]])
    torch.testing.assert_close(prune_by_magnitude(tensor, 0.5), expected, atol=0, rtol=0)  # int(0.5 * 6) = 3 kept


def test_random_pruning_keeps_a_density_fraction_rescaled():
    tensor = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    pruned = prune_at_random(tensor, 0.3)
    kept = pruned != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # 60,000 draws: 5 standard deviations
    torch.testing.assert_close(pruned[kept], tensor[kept] / 0.3)
    state = torch.get_rng_state()
    assert prune_at_random(tensor, 1.0) is tensor and torch.equal(torch.get_rng_state(), state)  # draws nothing


def test_ties_keeps_the_values_that_agree_with_the_elected_sign():
    tensors = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-3.0, -1.0, 0.5]), torch.tensor([1.0, 4.0, 0.0])]
    stacked = torch.stack(tensors)
    # "total" elects the sign of the sum (-1, +1, +1), "frequency" the most common sign (+, -, +).
    assert majority_sign_mask(stacked, "total").tolist() == [[False, False, True], [True, False, True],
                                                              [False, True, False]]
    assert majority_sign_mask(stacked, "frequency")[:, 1].tolist() == [True, True, False]
    weights = torch.tensor([1.0, 2.0, 0.5])
    merged = merge_tensors(tensors, weights, "ties", density=1.0, sign_method="total")
    # per entry: the mean of the weighted agreeing values
    torch.testing.assert_close(merged, torch.tensor([-6.0, 2.0, (0.5 + 1.0) / 2]))


# --- invalid calls ---------------------------------------------------------------------------------------


def two_adapters(llama, **other: Any) -> PeftModel:
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(**{"r": 4, "target_modules": ["q_proj"], "init_lora_weights": False,
                                             **other}))
    return model


@pytest.mark.parametrize(("combination_type", "options", "message"), [
    ("bogus", {}, "unknown combination_type 'bogus'"),
    ("svd", dict(desnity=0.5, svd_rnk=2), "unknown option.*desnity, svd_rnk"),
    ("linear", dict(density=0.5), "'linear' does not use density"),
    ("cat", dict(svd_rank=4), "'cat' does not use svd_rank"),
    ("dare_linear", dict(density=0.5, majority_sign_method="frequency"), "does not use majority_sign_method"),
    ("ties", {}, "pass density"),
    ("dare_linear", {}, "pass density"),
    ("dare_ties_svd", {}, "pass density"),
    ("magnitude_prune", {}, "pass density"),
    ("dare_ties", dict(density=0.0), r"density is the fraction .* \(0, 1\]"),
    ("ties", dict(density=1.5), r"density is the fraction .* \(0, 1\]"),
    ("ties", dict(density=0.5, majority_sign_method="max"), "majority_sign_method must be one of"),
    ("svd", dict(svd_rank=0), "svd_rank must be a positive integer"),
    ("svd", dict(svd_clamp=2), "svd_clamp is a quantile"),
    ("svd", dict(svd_full_matrices="yes"), "svd_full_matrices must be True or False"),
    ("svd", dict(svd_driver="lapack"), "svd_driver must be None or one of"),
    ("svd", dict(svd_driver="gesvd"), "needs the adapters on a CUDA device"),
])
def test_invalid_options_are_refused(llama, combination_type, options, message):
    model = two_adapters(llama)
    with pytest.raises(ConfigError, match=message):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "new", combination_type=combination_type,
                                   **options)
    assert not holds_adapter(model, "new")


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_factor_wise_types_need_one_rank(llama, combination_type):
    model = two_adapters(llama, r=2)
    with pytest.raises(ConfigError, match=r"ranks \[4, 2\]. Use combination_type 'cat' or 'svd'"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "new", combination_type=combination_type,
                                   density=0.5 if combination_type != "linear" else None)
    assert not holds_adapter(model, "new")


def test_factor_wise_types_need_one_rank_in_every_layer(llama):
    model = two_adapters(llama, rank_pattern={"q_proj": 2})  # largest ranks 4 and 4, but 4 and 2 on q_proj
    with pytest.raises(ConfigError, match=r"q_proj' has adapters of ranks \[2, 4\]"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "new", combination_type="linear")
    assert not holds_adapter(model, "new")


def test_a_layer_no_adapter_covers_is_refused_and_the_model_left_unchanged(llama, input_ids):
    # The new adapter takes the first adapter's layers_to_transform (none): v_proj of layer 0 has no source.
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["v_proj"], layers_to_transform=[1],
                                          init_lora_weights=False))
    model.eval()
    before = logits(model, {"input_ids": input_ids})
    with pytest.raises(ConfigError, match=r"targets 'model.layers.0.self_attn.v_proj', which none of"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "new", combination_type="cat")
    assert not holds_adapter(model, "new")
    torch.testing.assert_close(logits(model, {"input_ids": input_ids}), before, atol=0, rtol=0)


def test_regex_and_list_targets_do_not_mix(llama):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=r".*q_proj"))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="mix regexes and lists of names"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "new", combination_type="cat")
    assert not holds_adapter(model, "new")


def test_two_copies_of_one_module_to_save_cannot_be_combined(llama):
    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ConfigError, match="modules_to_save.*lm_head"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "new", combination_type="cat")
    assert not holds_adapter(model, "new")


@pytest.mark.parametrize("weights", [[1.0, float("nan")], [1.0, "x"], [True, 1.0]])
def test_weights_must_be_finite_numbers(llama, weights):
    model = two_adapters(llama)
    with pytest.raises(ConfigError, match="weights must be finite numbers"):
        model.add_weighted_adapter(["default", "other"], weights, "new", combination_type="cat")
    assert not holds_adapter(model, "new")


def test_merge_tensors_refuses_an_unknown_merge_with_a_config_error():
    tensors, weights = [torch.ones(2, 2), torch.ones(2, 2)], torch.tensor([0.5, 0.5])
    with pytest.raises(ConfigError, match="merge must be one of task_arithmetic, ties, .*, not 'average'"):
        merge_tensors(tensors, weights, "average")
    assert issubclass(ConfigError, ValueError)  # callers that caught the ValueError it was still catch it
