"""A method defined in user code has the power of a built-in one: the hooks for layer types, loss terms, an
adapter's deletion, subcommands and foreign formats work for a plugin the core has never heard of, and the
per-call hooks are resolved once per change of adapters, not dispatched through pluggy on every call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from peft_core import Method, PluginError, get_peft_model, hookimpl
from peft_core.cli import main
from peft_core.inject import LayerTable, inject_adapters
from peft_core.plugins import AdapterFormat, LayerType, registry
from peft_core.walk import find_target_modules
from scale_method import ScaleConfig, ScaleLinear
from torch import nn


class CountingPlugin:
    """A user-code plugin: a scale method whose training adds a loss term, and which records deletions."""

    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.loss_calls = 0

    @hookimpl
    def peft_register_methods(self, register):
        register(Method(name="penalised", peft_type="TEST_PENALISED", config_class=PenalisedConfig, adds_loss=True))

    @hookimpl
    def peft_inject(self, model, config, adapter_name):
        if isinstance(config, PenalisedConfig):
            return inject_adapters(model, config, adapter_name, LayerTable({
                "torch.nn.modules.linear.Linear": lambda base, config, name, module: ScaleLinear(base, config),
            }))
        return None

    @hookimpl
    def peft_loss(self, model, config, adapter_name):
        if not isinstance(config, PenalisedConfig):
            return None
        self.loss_calls += 1
        return torch.tensor(1000.0)

    @hookimpl
    def peft_delete(self, model, config, adapter_name):
        if isinstance(config, PenalisedConfig):
            self.deleted.append(adapter_name)


@dataclass
class PenalisedConfig(ScaleConfig):
    PEFT_TYPE: ClassVar[str] = "TEST_PENALISED"


@pytest.fixture
def counting():
    plugin = CountingPlugin()
    registry().register(plugin, name="counting-plugin")
    yield plugin
    registry().unregister("counting-plugin")


def test_a_loss_term_is_added_in_training_and_resolved_once(llama, input_ids, counting, monkeypatch):
    model = get_peft_model(llama, PenalisedConfig(target_modules=["o_proj"]))
    model.eval()
    plain = model(input_ids=input_ids, labels=input_ids).loss
    assert counting.loss_calls == 0  # not in eval mode
    model.train()
    dispatched = []
    first_answer = registry().first_answer
    monkeypatch.setattr(registry(), "first_answer", lambda *a, **k: dispatched.append(a) or first_answer(*a, **k))
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        torch.testing.assert_close(loss, plain + 1000)
    assert counting.loss_calls == 3 and len(dispatched) == 1  # pluggy once, then the plugin function directly
    model.set_adapter("default")  # any change of adapters resolves again
    model(input_ids=input_ids, labels=input_ids)
    assert len(dispatched) == 2


def test_deleting_unloading_and_merging_tell_the_plugin(llama, llama_dir, counting):
    from peft_core.testing import tiny_model

    model = get_peft_model(llama, PenalisedConfig(target_modules=["o_proj"]))
    model.add_adapter("other", PenalisedConfig(target_modules=["up_proj"]))
    model.delete_adapter("other")
    assert counting.deleted == ["other"]
    model.unload()
    assert counting.deleted == ["other", "default"]
    get_peft_model(tiny_model("llama", llama_dir), PenalisedConfig(target_modules=["o_proj"])).merge_and_unload()
    assert counting.deleted == ["other", "default", "default"]


class PackedLinear(nn.Linear):
    """A stand-in for a quantized Linear: it stores its weight transposed, which only its plugin knows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.t(), self.bias)


class PackedPlugin:
    @hookimpl
    def peft_register_layer_types(self, register):
        register(LayerType(
            f"{PackedLinear.__module__}.{PackedLinear.__qualname__}",
            read_weight=lambda layer: layer.weight.detach().t(),
            write_weight=lambda layer, weight: setattr(layer, "weight", nn.Parameter(weight.t().contiguous())),
            weight_elements=lambda layer: 3 * layer.weight.numel(),
        ))


def test_a_registered_layer_type_is_targeted_merged_and_counted():
    registry().register(PackedPlugin(), name="packed-plugin")
    try:
        torch.manual_seed(0)
        layer = PackedLinear(6, 4, bias=False)  # the test method scales outputs, a bias included: keep it exact
        layer.weight = nn.Parameter(torch.randn(4, 6).t().contiguous())  # stored as (in, out)
        model = nn.Sequential(layer, nn.ReLU())
        config = ScaleConfig(target_modules="all-linear", init_value=2.0)
        assert [name for name, _ in find_target_modules(model, config)] == ["0"]
        peft_model = get_peft_model(model, config)
        x = torch.randn(3, 6)
        expected = peft_model(x)
        trainable, total = peft_model.get_nb_trainable_parameters()
        assert trainable == 4
        assert total == 3 * 24 + 4  # the packed weight counts as its plugin says, then the 4 scales
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected)  # merged through the plugin's read and write
    finally:
        registry().unregister("packed-plugin")
    assert f"{PackedLinear.__module__}.PackedLinear" not in registry().layer_types  # gone with its plugin


def test_a_layer_type_or_format_registered_twice_is_refused():
    class Twice:
        @hookimpl
        def peft_register_formats(self, register):
            for _ in range(2):
                register(AdapterFormat("twice", "a format", export=lambda *a: "", import_=lambda *a: ""))

    with pytest.raises(PluginError, match="'twice' through peft_register_formats"):
        registry().register(Twice(), name="twice-plugin")
    assert "twice" not in registry().formats and not registry().manager.has_plugin("twice-plugin")


def test_a_plugin_adds_a_subcommand(capsys):
    class Hello:
        @hookimpl
        def peft_register_commands(self, register):
            def add_parser(subparsers):
                parser = subparsers.add_parser("hello", help="say hello")
                parser.set_defaults(run=lambda args: print("hello from a plugin") or 0)
                return parser

            register("hello", add_parser)

    registry().register(Hello(), name="hello-plugin")
    try:
        assert main(["hello"]) == 0
        assert capsys.readouterr().out == "hello from a plugin\n"
    finally:
        registry().unregister("hello-plugin")


def test_the_command_says_its_version_and_plain_help(capsys):
    import peft_core

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"peft-core {peft_core.__version__}"
    for command in [[], *([name] for name in registry().commands())]:
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "``" not in capsys.readouterr().out, command  # no reStructuredText markup in help text
