"""Default target modules: one table by model family and role, which plugins fill."""

from __future__ import annotations

import pytest
import torch
from peft_core import ConfigError, hookimpl, register_plugin
from peft_core.plugins import registry
from peft_core.targets import default_targets, model_families, targets_table
from peft_core.walk import find_target_modules
from scale_method import ScaleConfig
from torch import nn


def names(model, config):
    return [name for name, _ in find_target_modules(model, config)]


class LlamaTargets:
    """The defaults a method plugin adds for Llama, in two roles (as the LoRA and IA3 plugins do)."""

    @hookimpl
    def peft_default_targets(self, register):
        register("llama", "attention", ["q_proj", "v_proj"])
        register("llama", "feedforward", ["down_proj"])


@pytest.fixture(autouse=True)
def llama_targets():
    plugin = LlamaTargets()
    register_plugin(plugin, name="llama-targets")
    yield
    registry().unregister("llama-targets")


def test_a_config_reads_the_column_of_its_role(llama, monkeypatch):
    assert names(llama, ScaleConfig()) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    monkeypatch.setattr(ScaleConfig, "DEFAULT_TARGETS_ROLE", "feedforward")
    assert names(llama, ScaleConfig()) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_families_are_the_model_type_the_text_model_type_then_class_names(llama):
    assert model_families(llama)[:2] == ["llama", "LlamaForCausalLM"]
    assert "Module" in model_families(llama)


class Backbone(nn.Module):
    """A model no table knows."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mixer": nn.Linear(4, 4), "proj_out": nn.Linear(4, 4)})
                                    for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_an_unknown_family_lists_its_linear_layers():
    with pytest.raises(ConfigError, match=r"no default for a 'Backbone' model .*Linear-like layers are mixer, "
                                          r"proj_out \(e\.g\. target_modules="):
        find_target_modules(Backbone(), ScaleConfig())


class ExtraTargets:
    """A third-party plugin that teaches the table a family and a role of its own."""

    @hookimpl
    def peft_default_targets(self, register):
        register("Backbone", "attention", ["mixer"])
        register("llama", "scale", ["o_proj"])


@pytest.fixture
def extra_targets():
    plugin = ExtraTargets()
    register_plugin(plugin, name="extra-targets")
    yield
    registry().unregister("extra-targets")


def test_plugins_add_families_and_roles(llama, extra_targets, monkeypatch):
    assert names(Backbone(), ScaleConfig()) == ["blocks.0.mixer", "blocks.1.mixer"]
    monkeypatch.setattr(ScaleConfig, "DEFAULT_TARGETS_ROLE", "scale")
    assert names(llama, ScaleConfig()) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    registry().unregister("extra-targets")
    assert "scale" not in targets_table()["llama"]  # gone with the plugin that added it
    register_plugin(ExtraTargets(), name="extra-targets")  # for the fixture to unregister


def test_a_bad_registration_is_a_clear_error(llama):
    class Broken:
        @hookimpl
        def peft_default_targets(self, register):
            register("llama", "attention", "q_proj")  # a string, not a list

    plugin = Broken()
    register_plugin(plugin, name="broken-targets")
    try:
        with pytest.raises(ConfigError, match="needs a list of module names"):
            default_targets(llama, "attention")
    finally:
        registry().unregister("broken-targets")
