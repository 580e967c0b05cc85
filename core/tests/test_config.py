"""Configs: JSON round trip, tolerance of fields from newer versions, clear errors for bad values."""

from __future__ import annotations

import json
import warnings

import pytest
from peft_core import ConfigError
from peft_core.config import PeftConfig, config_from_dict
from scale_method import ScaleConfig


def test_json_round_trip(tmp_path):
    config = ScaleConfig(target_modules=["q_proj", "v_proj"], init_value=0.5, task_type="CAUSAL_LM",
                         layers_to_transform=1, layers_pattern="layers")
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "TEST_SCALE"
    assert data["layers_to_transform"] == [1]
    loaded = PeftConfig.from_pretrained(tmp_path)  # the class is found through peft_type
    assert type(loaded) is ScaleConfig
    assert loaded == config


def test_harmless_fields_of_other_versions_are_ignored_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ScaleConfig.from_dict({"peft_type": "TEST_SCALE", "peft_version": "9.9", "auto_mapping": {"x": 1},
                                         "eva_config": None, "use_qalora": False})
    assert config.init_value == 1.0


def test_unknown_field_with_an_effect_warns_and_names_it():
    with pytest.warns(UserWarning, match=r"ignoring layer_replication=\[\[0, 1\]\].*newer"):
        ScaleConfig.from_dict({"peft_type": "TEST_SCALE", "layer_replication": [[0, 1]]})


def test_wrong_peft_type_for_class():
    with pytest.raises(ConfigError, match="reads peft_type 'TEST_SCALE', not 'LORA'"):
        ScaleConfig.from_dict({"peft_type": "LORA"})


def test_config_without_peft_type():
    with pytest.raises(ConfigError, match="no 'peft_type'"):
        config_from_dict({"r": 8})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task_type": "CAUSAL"}, "task_type='CAUSAL' is not one of"),
        ({"target_modules": 3}, "target_modules must be"),
        ({"layers_pattern": "layers"}, "layers_pattern only has an effect with layers_to_transform"),
        ({"target_modules": "q.*", "layers_to_transform": [0]}, "cannot be combined with a regex"),
    ],
)
def test_invalid_values_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ScaleConfig(**kwargs)
