"""Which modules a config targets."""

from __future__ import annotations

import pytest
from peft_core import ConfigError
from peft_core.walk import find_target_modules, layer_index, matches
from scale_method import ScaleConfig


def names(model, **kwargs):
    return [name for name, _ in find_target_modules(model, ScaleConfig(**kwargs))]


def test_suffix_list_matches_at_dot_boundaries(llama):
    found = names(llama, target_modules=["q_proj", "mlp.up_proj"])
    assert found == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
    ]
    assert not matches("model.layers.0.self_attn.xq_proj", ["q_proj"])


def test_regex_is_a_full_match(llama):
    assert names(llama, target_modules=r".*\.1\.self_attn\.(k|v)_proj") == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
    ]


def test_all_linear_skips_the_output_head(llama):
    found = names(llama, target_modules="all-linear")
    assert len(found) == 2 * 7 and "lm_head" not in found


def test_exclude_modules_and_layers_to_transform(llama):
    found = names(llama, target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=["k_proj"],
                  layers_to_transform=[1], layers_pattern="layers")
    assert found == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_layer_index_with_default_patterns():
    assert layer_index("transformer.h.3.attn.c_attn", None) == 3
    assert layer_index("lm_head", None) is None


def test_unknown_target_lists_near_matches(llama):
    with pytest.raises(ConfigError, match=r"matched no module of LlamaForCausalLM.*Near matches: .*q_proj"):
        names(llama, target_modules=["qq_proj"])
