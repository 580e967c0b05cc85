"""BitFit's own numbers: the output formula, what trains, merging (with and without a base bias), LoRA on the
same layers, mixed batches and config errors."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from peft_bitfit import BitFitConfig
from peft_bitfit.config import DEFAULT_TARGETS
from peft_bitfit.layer import BitFitAdapter
from peft_core import AdapterLayer, ConfigError, PeftError, PeftModel, get_peft_model, stack
from peft_core.testing import tiny_model, train_steps
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from torch import nn

# peft-core's fixtures (llama, gpt2, tiny_model_dir, input_ids) are opt-in. In a repository of its own this
# line belongs in the top-level conftest.py; inside peft-core's repository a conftest here is not top-level.
pytest_plugins = ["peft_core.testing.fixtures"]


def logits(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def randomize_deltas(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bitfit_bias"):
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def layer0(model: PeftModel) -> nn.Module:
    """The first transformer block of a tiny Llama or GPT-2 under a PeftModel."""
    inner = model.base_model.model
    return inner.model.layers[0] if hasattr(inner, "model") else inner.transformer.h[0]


class TwoLinears(nn.Module):
    """A custom model: one Linear with a bias, one without."""

    def __init__(self) -> None:
        super().__init__()
        self.with_bias = nn.Linear(6, 5)
        self.without_bias = nn.Linear(5, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.without_bias(torch.tanh(self.with_bias(x)))


# --- the formula -------------------------------------------------------------------------------------------


def test_output_is_the_base_output_plus_the_delta(llama, gpt2):
    generator = torch.Generator().manual_seed(1)
    for base, target, width in [(llama, "q_proj", 64), (llama, "down_proj", 128), (gpt2, "c_attn", 64)]:
        model = get_peft_model(base, BitFitConfig(target_modules=[target]))
        layer = model.base_model.model.get_submodule(model.injected_modules("default")[0])
        x = torch.randn(3, 5, width, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # zero at the start
            randomize_deltas(model)
            delta = layer.adapters["default"].bitfit_bias
            assert delta.abs().min() > 0
            torch.testing.assert_close(layer(x), layer.base_layer(x) + delta, rtol=0, atol=0)


def test_a_base_bias_is_left_alone_and_a_missing_one_stays_missing(llama, gpt2):
    c_attn = gpt2.transformer.h[0].attn.c_attn
    bias_before = c_attn.bias.detach().clone()
    model = get_peft_model(gpt2, BitFitConfig(target_modules=["c_attn"]))
    randomize_deltas(model)
    train_steps(model, torch.randint(0, 128, (2, 8)), steps=2, lr=1e-1)
    assert torch.equal(layer0(model).attn.c_attn.base_layer.bias, bias_before)
    model = get_peft_model(llama, BitFitConfig(target_modules=["q_proj"]))
    assert layer0(model).self_attn.q_proj.base_layer.bias is None


# --- training and saving --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "count"), [
    # tiny Llama per block: q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64 = 512; two blocks
    ("llama", 1024),
    # tiny GPT-2 per block: c_attn 192 + attn.c_proj 64 + c_fc 256 + mlp.c_proj 64 = 576; two blocks
    ("gpt2", 1152),
])
def test_only_the_bias_deltas_train_and_they_are_what_is_saved(kind, count, tiny_model_dir, input_ids, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(kind, tiny_model_dir(kind)), BitFitConfig(task_type="CAUSAL_LM"))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".adapters.default.bitfit_bias") for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == count
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, input_ids, steps=8, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
        else:
            assert not torch.equal(param, trainable[name]), name
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {n.replace(".adapters.default", "") for n in trainable}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["missing_bias"] == "add"
    assert config["target_modules"] == DEFAULT_TARGETS[kind]  # the defaults, recorded
    loaded = PeftModel.from_pretrained(tiny_model(kind, tiny_model_dir(kind)), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))


# --- merging ---------------------------------------------------------------------------------------------


def test_merge_adds_the_delta_to_an_existing_bias_and_unmerge_restores_it(gpt2, input_ids):
    model = get_peft_model(gpt2, BitFitConfig())
    randomize_deltas(model)
    adapted = logits(model, input_ids)
    c_attn = layer0(model).attn.c_attn
    weight, bias = c_attn.base_layer.weight.detach().clone(), c_attn.base_layer.bias.detach().clone()
    delta = c_attn.adapters["default"].bitfit_bias.detach().clone()
    model.merge_adapter()
    assert torch.equal(c_attn.base_layer.weight, weight)  # BitFit changes no weight
    torch.testing.assert_close(c_attn.base_layer.bias, bias + delta, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(c_attn.base_layer.bias, bias, atol=1e-6, rtol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-5, rtol=1e-5)


def test_merging_into_a_layer_without_a_bias_adds_one_and_unmerging_removes_it(llama, input_ids):
    model = get_peft_model(llama, BitFitConfig(target_modules=["q_proj", "down_proj"]))
    randomize_deltas(model)
    adapted = logits(model, input_ids)
    names = {n for n, _ in model.named_parameters()}
    q_proj = layer0(model).self_attn.q_proj
    model.merge_adapter()
    created = q_proj.base_layer.bias
    assert isinstance(created, nn.Parameter) and not created.requires_grad
    torch.testing.assert_close(created, q_proj.adapters["default"].bitfit_bias, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert q_proj.base_layer.bias is None
    assert {n for n, _ in model.named_parameters()} == names
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), logits(model.get_base_model(), input_ids))
    merged = model.merge_and_unload()
    q_plain = merged.model.layers[0].self_attn.q_proj
    assert type(q_plain) is nn.Linear and q_plain.bias is not None
    torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-5, rtol=1e-5)
    # That bias is now the plain model's own: a new BitFit adapter merged and unmerged keeps it.
    folded = q_plain.bias.detach().clone()
    again = get_peft_model(merged, BitFitConfig(target_modules=["q_proj"]))
    again.merge_adapter()
    again.unmerge_adapter()
    torch.testing.assert_close(layer0(again).self_attn.q_proj.base_layer.bias, folded, rtol=0, atol=0)


@pytest.mark.parametrize("order", [("ia3", "bitfit"), ("bitfit", "ia3")])
def test_merging_with_ia3_scaling_the_same_bias_less_layer(order, llama, input_ids):
    # stack([IA3, BitFit]): l * (W x) + delta; stack([BitFit, IA3]): l * (W x + delta). Merged in that order,
    # IA3 finds no bias to scale when it comes first, and scales the added one when it comes second.
    configs = {"ia3": IA3Config(target_modules=["v_proj"], feedforward_modules=[], init_ia3_weights=False),
               "bitfit": BitFitConfig(target_modules=["v_proj"])}
    model = get_peft_model(llama, stack([configs[name] for name in order]))
    randomize_deltas(model)
    v_proj = layer0(model).self_attn.v_proj
    scale = v_proj.adapters["ia3"].ia3_l.detach().view(-1)
    delta = v_proj.adapters["bitfit"].bitfit_bias.detach()
    adapted = logits(model, input_ids)
    names = {n for n, _ in model.named_parameters()}
    model.merge_adapter()
    expected_bias = delta if order[0] == "ia3" else scale * delta
    torch.testing.assert_close(v_proj.base_layer.bias, expected_bias)
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert v_proj.base_layer.bias is None and {n for n, _ in model.named_parameters()} == names
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=1e-5, rtol=1e-5)


def test_two_merged_adapters_on_a_bias_less_layer_keep_the_bias_until_both_are_unmerged(llama, input_ids):
    model = get_peft_model(llama, BitFitConfig(target_modules=["v_proj"]), "a")
    model.add_adapter("b", BitFitConfig(target_modules=["v_proj"]))
    model.set_adapter(["a", "b"])
    randomize_deltas(model)
    v_proj = layer0(model).self_attn.v_proj
    a, b = (v_proj.adapters[n].bitfit_bias.detach() for n in "ab")
    adapted = logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(v_proj.base_layer.bias, a + b)
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    model.delete_adapter("a")  # unmerges "a" first: "b" is still merged into the bias "a" created
    torch.testing.assert_close(v_proj.base_layer.bias, b, atol=1e-6, rtol=0)
    model.unmerge_adapter()
    assert v_proj.base_layer.bias is None


def test_safe_merge_refuses_a_nan_delta_and_changes_nothing(llama):
    model = get_peft_model(llama, BitFitConfig(target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        layer0(model).self_attn.v_proj.adapters["default"].bitfit_bias[3] = float("nan")
    with pytest.raises(PeftError, match=r"gives NaN or Inf biases; the model was left unchanged"):
        model.merge_adapter(safe_merge=True)
    assert layer0(model).self_attn.q_proj.base_layer.bias is None
    assert layer0(model).self_attn.q_proj.merged_adapters == []


def test_merging_a_bfloat16_base_adds_a_bfloat16_bias(tiny_model_dir, input_ids):
    base = tiny_model("llama", tiny_model_dir("llama"), dtype=torch.bfloat16)
    model = get_peft_model(base, BitFitConfig(target_modules=["o_proj"]))
    randomize_deltas(model)
    o_proj = layer0(model).self_attn.o_proj
    assert o_proj.adapters["default"].bitfit_bias.dtype == torch.float32  # adapters of half bases are float32
    adapted = logits(model, input_ids)
    model.merge_adapter()
    assert o_proj.base_layer.bias.dtype == torch.bfloat16
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=0.05, rtol=0.02)


# --- with LoRA -------------------------------------------------------------------------------------------


def test_stacked_with_lora_on_the_same_layers(llama, llama_dir, input_ids, tmp_path):
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj"]
    model = get_peft_model(llama, stack([
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        BitFitConfig(target_modules=targets),
    ]))
    assert model.active_adapters == ["lora", "bitfit"]
    randomize_deltas(model)
    v_proj = layer0(model).self_attn.v_proj
    assert list(v_proj.adapters) == ["lora", "bitfit"]  # both on one wrapper
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    lora = v_proj.adapters["lora"]
    with torch.no_grad():
        low_rank = 2.0 * x @ lora.lora_A.weight.t() @ lora.lora_B.weight.t()  # scaling = 8 / 4
        expected = v_proj.base_layer(x) + low_rank + v_proj.adapters["bitfit"].bitfit_bias
        torch.testing.assert_close(v_proj(x), expected)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"weight", "bitfit_bias"}
    assert sum(n.endswith("bitfit_bias") for n in trainable) == 4  # two layers, two blocks
    losses = train_steps(model, input_ids, steps=6, lr=5e-2)
    assert losses[-1] < losses[0]
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "bitfit" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path)
    assert loaded.active_adapters == ["lora", "bitfit"]
    torch.testing.assert_close(logits(loaded, input_ids), expected)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-4, rtol=1e-4)


# --- mixed batches ------------------------------------------------------------------------------------


def test_mixed_batch_gives_each_sample_its_own_delta(gpt2, input_ids):
    model = get_peft_model(gpt2, BitFitConfig(), "a")
    model.add_adapter("b", BitFitConfig())
    randomize_deltas(model)
    model.eval()
    expected = []
    for name in ["a", "b"]:
        model.set_adapter(name)
        expected.append(logits(model, input_ids))
    with model.disable_adapter():
        expected.append(logits(model, input_ids))
    batch = torch.cat([input_ids[:1]] * 3)
    mixed = logits(model, batch, adapter_names=["a", "b", "__base__"])
    for row, each in enumerate(expected):
        torch.testing.assert_close(mixed[row], each[0], atol=1e-5, rtol=1e-5)
    assert (expected[0] - expected[1]).abs().max() > 1e-2


# --- layers without a bias: the three choices, and config errors -----------------------------------------


def test_missing_bias_add_skip_and_error():
    torch.manual_seed(0)
    added = get_peft_model(TwoLinears(), BitFitConfig(target_modules=["with_bias", "without_bias"]))
    assert added.injected_modules("default") == ["with_bias", "without_bias"]
    assert added.base_model.model.without_bias.adapters["default"].bitfit_bias.shape == (4,)

    skipped = get_peft_model(TwoLinears(), BitFitConfig(target_modules=["with_bias", "without_bias"],
                                                        missing_bias="skip"))
    assert skipped.injected_modules("default") == ["with_bias"]
    assert type(skipped.base_model.model.without_bias) is nn.Linear
    assert skipped.peft_config["default"].target_modules == ["with_bias", "without_bias"]  # saved as given

    with pytest.raises(ConfigError, match=r"missing_bias='error'\): 1 target layers have no bias, e.g. without_bias"):
        get_peft_model(TwoLinears(), BitFitConfig(target_modules=["with_bias", "without_bias"], missing_bias="error"))


def test_config_errors_are_clear(llama):
    with pytest.raises(ConfigError, match=r"missing_bias must be one of 'add', 'skip', 'error' .* not 'yes'"):
        BitFitConfig(missing_bias="yes")
    with pytest.raises(ConfigError, match=r"missing_bias='skip'\): none of the 14 target layers has a bias"):
        get_peft_model(llama, BitFitConfig(missing_bias="skip"))
    with pytest.raises(ConfigError, match=r"cannot adapt 'model.embed_tokens', a Embedding; it adapts Conv1D, Linear"):
        get_peft_model(llama, BitFitConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match=r"matched no module of LlamaForCausalLM. Near matches: .*q_proj"):
        get_peft_model(llama, BitFitConfig(target_modules=["qproj"]))
    assert not any(isinstance(m, AdapterLayer) for m in llama.modules())  # nothing was changed
    assert BitFitAdapter(3).bitfit_bias.abs().sum() == 0
