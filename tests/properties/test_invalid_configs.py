"""Property tests: invalid configs of every method fail with a ``PeftError`` that says what is wrong.

A valid config per method and model is corrupted at random: a field gets a value of the wrong type, or a
value of the right type that the method cannot use, or targets that match nothing. Built directly or
from a dict (as ``adapter_config.json`` would give it), then injected and run, it must raise a
``PeftError`` subclass with a message, never another exception from deep inside torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_adalora import AdaLoraConfig
from peft_core import ConfigError, PeftConfig, PeftError, PeftModel, get_peft_model
from peft_core.config import LayerConfig, config_from_dict
from peft_core.testing import strip_checksums
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from peft_p_tuning import PromptEncoderConfig
from peft_prefix_tuning import PrefixTuningConfig
from peft_prompt_tuning import PromptTuningConfig
from peft_qlora import QLoraConfig

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
EMBEDDINGS = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
NAN, INF = math.nan, math.inf

# Values of each JSON type, to put into fields whose annotation does not allow them.
ANY_JSON = ["8", "", 3, 0.5, True, None, [1.5], [None], ["x", 2], {"x": "y"}, {"x": [1.5]}]

# Values of the right type that the method cannot use, by method (changes to a valid config).
LAYER_MISTAKES = [
    {"target_modules": ["no_such_layer"]}, {"target_modules": []}, {"target_modules": "("},
    {"target_modules": "q.*", "layers_to_transform": [0]}, {"layers_to_transform": [7]},
    {"layers_to_transform": [-1]}, {"layers_to_transform": [0], "layers_pattern": "no_such_stack"},
    {"layers_pattern": "layers"}, {"exclude_modules": "("}, {"task_type": "CAUSAL"},
]
SOFT_PROMPT_MISTAKES = [
    {"num_virtual_tokens": 0}, {"num_virtual_tokens": -2}, {"num_virtual_tokens": None}, {"token_dim": 0},
    {"token_dim": 7}, {"num_layers": 0}, {"num_layers": 5}, {"num_attention_heads": -1},
    {"num_transformer_submodules": 0}, {"task_type": "CAUSAL"},
]
LORA_MISTAKES = [
    {"r": 0}, {"r": -1}, {"lora_alpha": NAN}, {"lora_alpha": INF}, {"lora_dropout": -0.1}, {"lora_dropout": 1.0},
    {"lora_dropout": NAN}, {"bias": "some"}, {"init_lora_weights": "olora"}, {"rank_pattern": {"q_proj": 0}},
    {"rank_pattern": {"(": 2}}, {"alpha_pattern": {"q_proj": NAN}}, {"alpha_pattern": {"(?i)q": 2}},
]
MISTAKES: dict[str, list[dict]] = {
    "lora": [*LAYER_MISTAKES, *LORA_MISTAKES],
    "qlora": [*LORA_MISTAKES, {"bits": 3}, {"quant_type": "int4"}, {"compute_dtype": "float64"}],
    "ia3": [*LAYER_MISTAKES, {"feedforward_modules": ["o_proj"]}, {"feedforward_modules": "("}],
    "adalora": [
        *LAYER_MISTAKES, {"init_r": 0}, {"target_r": 9}, {"total_step": None}, {"total_step": 0},
        {"tinit": 6, "tfinal": 4}, {"tinit": -1}, {"beta1": 0.0}, {"beta1": NAN}, {"beta2": 1.5},
        {"orth_reg_weight": -1.0}, {"orth_reg_weight": NAN}, {"deltaT": 0}, {"lora_alpha": NAN},
        {"lora_dropout": 1.0}, {"bias": "some"}, {"init_lora_weights": "gaussian"},
        {"rank_pattern": {"x.lora_E": "abc"}}, {"rank_pattern": {"x.lora_E": [True]}},
        {"rank_pattern": {"x.lora_E": 99}},
    ],
    "prompt_tuning": [
        *SOFT_PROMPT_MISTAKES, {"prompt_tuning_init": "BOGUS"},
        {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "w5 w6"},
        {"tokenizer_kwargs": {"trust_remote_code": True}},
    ],
    "p_tuning": [
        *SOFT_PROMPT_MISTAKES, {"encoder_reparameterization_type": "GRU"}, {"encoder_hidden_size": 0},
        {"encoder_num_layers": 0}, {"encoder_dropout": 1.0}, {"encoder_dropout": NAN}, {"encoder_dropout": -0.5},
    ],
    "prefix_tuning": [
        *SOFT_PROMPT_MISTAKES, {"token_dim": 30, "num_attention_heads": 4}, {"num_attention_heads": 3},
        {"num_attention_heads": 8}, {"encoder_hidden_size": 0}, {"encoder_hidden_size": -4},
    ],
}


def kind_mistakes(method: str, kind: str) -> list[dict]:
    """Mistakes that need the model's layer names: adapting a layer and saving it in full, DoRA on an
    embedding, excluding every target."""
    if method not in ("lora", "ia3", "adalora"):
        return []
    found = [{"modules_to_save": TARGETS[kind][:1]}, {"exclude_modules": TARGETS[kind]}]
    if method == "lora":
        found.append({"target_modules": [EMBEDDINGS[kind]], "use_dora": True})
    return found


def valid_fields(method: str, kind: str) -> dict[str, Any]:
    if method in ("lora", "qlora"):
        return {"target_modules": TARGETS[kind], "r": 2}
    if method == "ia3":
        return {"target_modules": TARGETS[kind], "feedforward_modules": []}
    if method == "adalora":
        return {"target_modules": TARGETS[kind], "init_r": 4, "target_r": 2, "total_step": 10}
    return {"num_virtual_tokens": 2}


CLASSES: dict[str, type[PeftConfig]] = {
    "lora": LoraConfig, "qlora": QLoraConfig, "ia3": IA3Config, "adalora": AdaLoraConfig,
    "prompt_tuning": PromptTuningConfig, "p_tuning": PromptEncoderConfig, "prefix_tuning": PrefixTuningConfig,
}
KINDS = {"qlora": ("llama",), "prefix_tuning": ("llama", "gpt2")}  # else llama, gpt2, bert


def accepts(annotation: str, value: Any) -> bool:
    """Whether a field annotated ``annotation`` (its source text) may hold ``value``, judged from the text
    alone so as not to reuse the library's own check. Errs towards yes: only values it rejects are used."""
    options = annotation.split(" | ")  # no config nests a union inside brackets
    if "Any" in options:
        return True
    if isinstance(value, bool):
        return "bool" in options
    if isinstance(value, (int, float)):
        return "float" in options or (isinstance(value, int) and "int" in options)
    if isinstance(value, (str, type(None))):
        return type(value).__name__.replace("NoneType", "None") in options
    if isinstance(value, list):  # of the lists above, only [1.5] could fit, and only a list of floats
        return value == [1.5] and "list[float]" in options
    return any(o in ("dict[str, Any]", "dict[str, str]") for o in options)


@st.composite
def wrong_types(draw: st.DrawFn, cls: type[PeftConfig]) -> tuple[str, Any]:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    field = draw(st.sampled_from(fields))
    wrong = [v for v in ANY_JSON if not accepts(field.type, v)]
    return field.name, draw(st.sampled_from(wrong))


def build(cls: type[PeftConfig], fields: dict[str, Any], from_dict: bool) -> PeftConfig:
    if not from_dict:
        return cls(**fields)
    data = json.loads(json.dumps({"peft_type": cls.PEFT_TYPE, **fields}))  # what a file would give
    return cls.from_dict(data) if cls is QLoraConfig else config_from_dict(data)


def check_refused(method: str, kind: str, fields: dict[str, Any], from_dict: bool, fresh, inputs) -> PeftError:
    """Build, inject and run: one of them must raise a PeftError with a message."""
    with pytest.raises(PeftError) as error:
        model = get_peft_model(fresh(kind), build(CLASSES[method], fields, from_dict))
        with torch.no_grad():
            model(**inputs(kind))
    assert str(error.value).strip()
    return error.value


def kinds(method: str) -> tuple[str, ...]:
    return KINDS.get(method, ("llama", "gpt2", "bert"))


@pytest.mark.parametrize("method", CLASSES)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data(), from_dict=st.booleans())
def test_wrong_types_raise_config_errors_naming_the_field(method, data, from_dict, fresh, make_inputs):
    kind = data.draw(st.sampled_from(kinds(method)), label="kind")
    name, value = data.draw(wrong_types(CLASSES[method]), label="field and value")
    fields = {"task_type": TASKS[kind], **valid_fields(method, kind), name: value}
    error = check_refused(method, kind, fields, from_dict, fresh, make_inputs)
    assert isinstance(error, ConfigError)
    assert f"{CLASSES[method].__name__}.{name} must be " in str(error)


@pytest.mark.parametrize("method", CLASSES)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data(), from_dict=st.booleans())
def test_unusable_values_raise_peft_errors(method, data, from_dict, fresh, make_inputs):
    kind = data.draw(st.sampled_from(kinds(method)), label="kind")
    mistakes = data.draw(st.lists(st.sampled_from(MISTAKES[method] + kind_mistakes(method, kind)), min_size=1,
                                  max_size=3), label="mistakes")
    fields, changed = {"task_type": TASKS[kind], **valid_fields(method, kind)}, set()
    for mistake in mistakes:
        if changed.isdisjoint(mistake):  # a later mistake could repair an earlier one's partner field
            fields.update(mistake)
            changed |= mistake.keys()
    check_refused(method, kind, fields, from_dict, fresh, make_inputs)


@pytest.mark.parametrize("method", CLASSES)
def test_every_unusable_value_raises_a_peft_error(method, fresh, make_inputs):
    """Each listed mistake alone, on every model, built both ways (the property above combines them)."""
    for kind in kinds(method):
        for mistake in MISTAKES[method] + kind_mistakes(method, kind):
            for from_dict in (False, True):
                fields = {"task_type": TASKS[kind], **valid_fields(method, kind), **mistake}
                check_refused(method, kind, fields, from_dict, fresh, make_inputs)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("r", "8", "int"), ("target_modules", 5, "a list of str, str or None"), ("lora_dropout", "0.1", "float"),
    ("lora_alpha", [1], "float"), ("rank_pattern", {"q": "x"}, "a dict of str to int"),
    ("layers_to_transform", "abc", "a list of int, int or None"), ("use_dora", "yes", "bool"),
])
def test_hostile_adapter_config_gets_one_clear_error(tmp_path, fresh, field, value, expected):
    """A saved adapter whose adapter_config.json has a wrong type loads with a ConfigError naming the config
    class, the field, the expected type and the bad value."""
    get_peft_model(fresh("llama"), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    strip_checksums(tmp_path)  # a stranger's file, not one this library saved
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ConfigError) as error:
        PeftModel.from_pretrained(fresh("llama"), tmp_path)
    message = str(error.value)
    assert f"LoraConfig.{field} must be {expected}, not {type(value).__name__} ({value!r})" in message


def test_type_check_takes_what_configs_are_commonly_written_with():
    config = LoraConfig(target_modules={"v_proj", "q_proj"}, layers_to_transform=(0,), lora_alpha=16, lora_dropout=0)
    assert config.target_modules == ["q_proj", "v_proj"] and config.layers_to_transform == [0]
    with pytest.raises(ConfigError, match=r"LoraConfig.lora_alpha must be float, not bool \(True\)"):
        LoraConfig(lora_alpha=True)


@dataclasses.dataclass
class ForeignConfig(LayerConfig):
    PEFT_TYPE: ClassVar[str] = "FOREIGN"
    extra: OnlyImportedForTypeCheckers | None = None  # noqa: F821 - a name under `if TYPE_CHECKING:`


def test_config_whose_annotations_do_not_resolve_is_not_type_checked():
    assert ForeignConfig(extra=3, target_modules=["q_proj"]).extra == 3
