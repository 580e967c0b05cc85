"""Property tests: random valid configs of every method on tiny Llama, GPT-2 and BERT models.

For each drawn config, with the adapter's parameters perturbed so that it changes the outputs:
saving and loading onto a fresh copy of the base gives equal logits (and an equal config), merging and
unmerging restores the logits (soft prompts refuse to merge, changing nothing), and ``disable_adapter``
gives the base model's logits.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_adalora import AdaLoraConfig
from peft_core import PeftConfig, PeftError, PeftModel, get_peft_model
from peft_core.config import PromptLearningConfig
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from peft_p_tuning import PromptEncoderConfig
from peft_prefix_tuning import PrefixTuningConfig
from peft_prompt_tuning import PromptTuningConfig
from peft_qlora import QLoraConfig
from torch import nn

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
# Linear-like layers by suffix; no entry is a suffix of another's match, so excluding some leaves the rest.
LINEAR = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense"],
}
# Untied input embeddings (GPT-2's is tied to its head, which merging it would change too).
EMBEDDINGS = {"llama": ["embed_tokens"], "gpt2": [], "bert": ["word_embeddings"]}
LAYER_STACKS = {"llama": "layers", "gpt2": "h", "bert": "layer"}
SAVED_IN_FULL = {"llama": ["lm_head", "norm"], "gpt2": ["ln_f"], "bert": []}  # BERT's classifier is added
ONE_MODULE = {  # a full module name per kind, for AdaLoRA's per-module rank_pattern
    "llama": "model.layers.0.self_attn.q_proj", "gpt2": "transformer.h.0.attn.c_attn",
    "bert": "bert.encoder.layer.0.attention.self.query",
}
EXAMPLES = 15
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True)

alphas = st.one_of(st.integers(1, 16), st.floats(0.5, 16))
dropouts = st.sampled_from([0.0, 0.1, 0.5])  # in eval mode dropout changes nothing, but must load and save


def sublist(items: list[str], min_size: int = 1, max_size: int | None = None) -> st.SearchStrategy[list[str]]:
    if not items:
        return st.just([])
    return st.lists(st.sampled_from(items), min_size=min_size, max_size=max_size, unique=True)


@st.composite
def layer_fields(draw: st.DrawFn, kind: str, extra_targets: tuple[str, ...] = ()) -> dict:
    """Targets (a list, a regex or "all-linear"), exclusions, layer selection and modules_to_save."""
    fields: dict = {
        "task_type": draw(st.sampled_from([TASKS[kind], None])) if kind != "bert" else "SEQ_CLS",
        "fan_in_fan_out": draw(st.booleans()),  # the layer's layout decides; the flag is only recorded
    }
    style = draw(st.sampled_from(["list", "regex", "all-linear"]))
    if style == "regex":
        chosen = draw(sublist(LINEAR[kind] + list(extra_targets)))
        fields["target_modules"] = rf".*\.({'|'.join(re.escape(n) for n in chosen)})"
        return fields | draw(saved_in_full(kind))
    pool = draw(sublist(LINEAR[kind])) if style == "list" else LINEAR[kind]
    fields["target_modules"] = pool if style == "list" else "all-linear"
    if len(pool) > 1 and draw(st.booleans()):  # a strict subset, so some target remains
        fields["exclude_modules"] = draw(sublist(pool, max_size=len(pool) - 1))
    if draw(st.booleans()):
        fields["layers_to_transform"] = draw(st.one_of(st.integers(0, 1), sublist([0, 1])))
        fields["layers_pattern"] = draw(st.sampled_from([None, LAYER_STACKS[kind], [LAYER_STACKS[kind]]]))
    elif style == "list":  # extra targets sit in no block, so only without layers_to_transform
        fields["target_modules"] = pool + draw(sublist(list(extra_targets), min_size=0))
    return fields | draw(saved_in_full(kind))


@st.composite
def saved_in_full(draw: st.DrawFn, kind: str) -> dict:
    if SAVED_IN_FULL[kind] and draw(st.booleans()):
        return {"modules_to_save": draw(sublist(SAVED_IN_FULL[kind]))}
    return {}


@st.composite
def lora_configs(draw: st.DrawFn, kind: str) -> LoraConfig:
    use_dora = draw(st.booleans())
    fields = draw(layer_fields(kind, () if use_dora else tuple(EMBEDDINGS[kind])))  # DoRA: Linear only
    names = LINEAR[kind]
    return LoraConfig(
        **fields, r=draw(st.integers(1, 6)), lora_alpha=draw(alphas), lora_dropout=draw(dropouts),
        use_rslora=draw(st.booleans()), use_dora=use_dora, bias=draw(st.sampled_from(["none", "all", "lora_only"])),
        init_lora_weights=draw(st.sampled_from([True, False, "gaussian"])),
        rank_pattern=draw(st.dictionaries(st.sampled_from(names), st.integers(1, 6), max_size=2)),
        alpha_pattern=draw(st.dictionaries(st.sampled_from(names), alphas, max_size=2)),
    )


@st.composite
def qlora_configs(draw: st.DrawFn, kind: str) -> QLoraConfig:
    return QLoraConfig(
        target_modules=draw(sublist(LINEAR[kind], max_size=3)), r=draw(st.integers(1, 4)), lora_alpha=draw(alphas),
        use_dora=draw(st.booleans()), bits=draw(st.sampled_from([4, 8])),
        quant_type=draw(st.sampled_from(["nf4", "fp4"])), double_quant=draw(st.booleans()),
        compute_dtype=draw(st.sampled_from([None, "float32"])),
    )


@st.composite
def ia3_configs(draw: st.DrawFn, kind: str) -> IA3Config:
    fields = draw(layer_fields(kind))
    targets = fields["target_modules"] if isinstance(fields["target_modules"], list) else LINEAR[kind]
    feedforward = draw(sublist(targets, min_size=0)) if isinstance(fields["target_modules"], list) else None
    return IA3Config(**fields, feedforward_modules=feedforward, init_ia3_weights=draw(st.booleans()))


@st.composite
def adalora_configs(draw: st.DrawFn, kind: str) -> AdaLoraConfig:
    init_r = draw(st.integers(1, 6))
    total_step = draw(st.integers(2, 50))
    tinit = draw(st.integers(0, total_step - 1))
    masks = st.lists(st.booleans(), min_size=init_r, max_size=init_r)
    return AdaLoraConfig(
        **draw(layer_fields(kind)), init_r=init_r, target_r=draw(st.integers(1, init_r)), total_step=total_step,
        tinit=tinit, tfinal=draw(st.integers(0, total_step - 1 - tinit)), deltaT=draw(st.integers(1, 5)),
        beta1=draw(st.floats(0.5, 0.99)), beta2=draw(st.floats(0.5, 0.99)), orth_reg_weight=draw(st.floats(0, 1)),
        lora_alpha=draw(alphas), lora_dropout=draw(dropouts), bias=draw(st.sampled_from(["none", "all"])),
        init_lora_weights=draw(st.booleans()),
        rank_pattern=draw(st.none() | st.fixed_dictionaries({f"{ONE_MODULE[kind]}.lora_E": masks})),
    )


def prompt_fields(draw: st.DrawFn, kind: str) -> dict:
    return {"task_type": TASKS[kind], "num_virtual_tokens": draw(st.integers(1, 5)), **draw(saved_in_full(kind))}


@st.composite
def prompt_tuning_configs(draw: st.DrawFn, kind: str) -> PromptTuningConfig:
    init = draw(st.sampled_from(["RANDOM", "SAMPLE_VOCAB"]))
    return PromptTuningConfig(**prompt_fields(draw, kind), prompt_tuning_init=init)


@st.composite
def p_tuning_configs(draw: st.DrawFn, kind: str) -> PromptEncoderConfig:
    encoder = draw(st.sampled_from(["MLP", "LSTM"]))
    return PromptEncoderConfig(
        **prompt_fields(draw, kind), encoder_reparameterization_type=encoder,
        encoder_hidden_size=draw(st.none() | st.integers(4, 24)),
        encoder_num_layers=draw(st.integers(1, 2)) if encoder == "LSTM" else 2,
        encoder_dropout=draw(st.floats(0, 0.3)),
    )


@st.composite
def prefix_tuning_configs(draw: st.DrawFn, kind: str) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        **prompt_fields(draw, kind), prefix_projection=draw(st.booleans()),
        encoder_hidden_size=draw(st.none() | st.integers(4, 24)),
    )


ALL_KINDS = ("llama", "gpt2", "bert")
METHODS: dict[str, tuple[Callable[[str], st.SearchStrategy[PeftConfig]], tuple[str, ...]]] = {
    "lora": (lora_configs, ALL_KINDS),
    "ia3": (ia3_configs, ALL_KINDS),
    "adalora": (adalora_configs, ALL_KINDS),
    "prompt_tuning": (prompt_tuning_configs, ALL_KINDS),
    "p_tuning": (p_tuning_configs, ALL_KINDS),
    "prefix_tuning": (prefix_tuning_configs, ("llama", "gpt2")),  # transformers' BERT takes no cache
}


def draw_case(data: st.DataObject, method: str) -> tuple[str, PeftConfig]:
    strategy, kinds = METHODS[method]
    kind = data.draw(st.sampled_from(kinds), label="kind")
    return kind, data.draw(strategy(kind), label="config")


def adapted(base: nn.Module, config: PeftConfig, seed: int, move_base: bool = True) -> PeftModel:
    """``base`` with the adapter, every trainable tensor moved by noise so the adapter is not an identity.

    With ``move_base``, base tensors that the adapter trains (LoRA's ``bias``) move too; they are saved with
    the adapter, but ``disable_adapter`` cannot undo them (nor can Hugging Face PEFT's).
    """
    base_tensors = {id(p) for p in base.parameters()}
    model = get_peft_model(base, config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and (move_base or id(param) not in base_tensors):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def quantized_base(fresh: Callable[[str], nn.Module], kind: str, config: QLoraConfig) -> nn.Module:
    from peft_qlora import quantize_model

    return quantize_model(fresh(kind), config)


def check_save_and_load(model: PeftModel, loading_base: nn.Module, kind: str, outputs: Callable) -> None:
    expected = outputs(model, kind)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = PeftModel.from_pretrained(loading_base, directory).eval()
    torch.testing.assert_close(outputs(loaded, kind), expected)
    config = model.peft_config["default"]
    assert loaded.peft_config["default"].to_dict() == {**config.to_dict(), "inference_mode": True}


def check_merge_and_unmerge(model: PeftModel, kind: str, outputs: Callable, merge_tolerance: float = 1e-3) -> None:
    expected = outputs(model, kind)
    if isinstance(model.peft_config["default"], PromptLearningConfig):
        with pytest.raises(PeftError, match="."):
            model.merge_adapter()
        torch.testing.assert_close(outputs(model, kind), expected)
        return
    model.merge_adapter()
    torch.testing.assert_close(outputs(model, kind), expected, rtol=merge_tolerance, atol=merge_tolerance)
    model.unmerge_adapter()
    torch.testing.assert_close(outputs(model, kind), expected, rtol=1e-4, atol=1e-4)


def check_disable(model: PeftModel, base_outputs: torch.Tensor, kind: str, outputs: Callable) -> None:
    assert differ(outputs(model, kind), base_outputs), "the adapter changes nothing: a vacuous test"
    with model.disable_adapter():
        torch.testing.assert_close(outputs(model, kind), base_outputs)
    assert differ(outputs(model, kind), base_outputs)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    # A causal LM with a soft prompt also returns logits for the virtual tokens.
    return a.shape != b.shape or not torch.allclose(a, b)


@pytest.mark.parametrize("method", METHODS)
@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_save_then_load_gives_equal_outputs(method, data, seed, fresh, outputs):
    kind, config = draw_case(data, method)
    check_save_and_load(adapted(fresh(kind), config, seed), fresh(kind), kind, outputs)


@pytest.mark.parametrize("method", METHODS)
@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_merge_then_unmerge_restores_outputs(method, data, seed, fresh, outputs):
    kind, config = draw_case(data, method)
    check_merge_and_unmerge(adapted(fresh(kind), config, seed), kind, outputs)


@pytest.mark.parametrize("method", METHODS)
@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_disabled_adapter_gives_base_outputs(method, data, seed, fresh, outputs):
    kind, config = draw_case(data, method)
    base = fresh(kind)
    base_outputs = outputs(base, kind)
    check_disable(adapted(base, config, seed, move_base=False), base_outputs, kind, outputs)


@settings(max_examples=6, deadline=None, derandomize=True)  # bitsandbytes is slow on the CPU
@given(config=qlora_configs("llama"), seed=st.integers(0, 2**16))
def test_qlora_properties(config, seed, fresh, outputs):
    base = quantized_base(fresh, "llama", config)
    base_outputs = outputs(base, "llama")
    model = adapted(base, config, seed, move_base=False)
    check_disable(model, base_outputs, "llama", outputs)
    check_merge_and_unmerge(model, "llama", outputs, merge_tolerance=0.3)  # merging re-quantizes to 4 or 8 bits
    check_save_and_load(model, quantized_base(fresh, "llama", config), "llama", outputs)
