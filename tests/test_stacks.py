"""stack([...]): methods composed on one model, trained, saved, reloaded, merged; and a third-party method."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft_core import AdapterLoadError, PeftError, PeftModel, get_peft_model, reset_registry, stack
from peft_core.testing import tiny_model, train_steps
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from peft_prefix_tuning import PrefixTuningConfig
from peft_prompt_tuning import PromptTuningConfig


def lora(**settings):
    return LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **settings})


def ia3():
    return IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_a_stack_is_its_members_applied_by_hand_in_order(llama_dir, input_ids):
    torch.manual_seed(0)
    stacked = get_peft_model(tiny_model("llama", llama_dir), stack([lora(), ia3()]))
    assert stacked.active_adapters == ["lora", "ia3"]
    torch.manual_seed(0)
    by_hand = get_peft_model(tiny_model("llama", llama_dir), lora(), "lora")
    by_hand.add_adapter("ia3", ia3())
    by_hand.set_adapter(["lora", "ia3"])
    torch.testing.assert_close(logits(stacked, input_ids), logits(by_hand, input_ids))


def test_order_on_one_layer_is_the_documented_one(llama):
    model = get_peft_model(llama, stack([lora(), ia3()]))
    v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 64)
    lora_adapter, ia3_adapter = v_proj.adapters["lora"], v_proj.adapters["ia3"]
    with torch.no_grad():
        lora_delta = lora_adapter.scaling * x @ lora_adapter.lora_A.weight.T @ lora_adapter.lora_B.weight.T
        scale = ia3_adapter.ia3_l.view(-1)
        torch.testing.assert_close(v_proj(x), (v_proj.base_layer(x) + lora_delta) * scale)  # lora, then ia3
        model.set_adapter(stack(["ia3", "lora"]))
        torch.testing.assert_close(v_proj(x), v_proj.base_layer(x) * scale + lora_delta)  # ia3, then lora


def test_three_methods_train_save_and_reload(llama, llama_dir, input_ids, tmp_path):
    model = get_peft_model(llama, stack([
        lora(), ia3(), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    ]))
    assert model.active_adapters == ["lora", "ia3", "prefix-tuning"]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, input_ids, steps=6)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    for member in ("adapters.lora.", "adapters.ia3.", "peft_soft_prompts.prefix-tuning."):
        assert any(member in n for n in changed), member
    assert all(".adapters." in n or "peft_soft_prompts" in n for n in changed), "the base changed"

    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / "peft_stack.json").read_text())
    assert manifest["adapters"] == ["lora", "ia3", "prefix-tuning"]
    assert manifest["config_sha256"] == {  # each member's config as this save wrote it
        name: hashlib.sha256((tmp_path / name / "adapter_config.json").read_bytes()).hexdigest()
        for name in manifest["adapters"]
    }
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path)
    assert loaded.active_adapters == ["lora", "ia3", "prefix-tuning"]
    torch.testing.assert_close(logits(loaded, input_ids), expected)

    # Each member is a normal adapter: it loads alone, here and in Hugging Face PEFT, with equal outputs.
    model.set_adapter("lora")
    alone = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "lora")
    hf_alone = peft.PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(alone, input_ids), logits(model, input_ids))
    torch.testing.assert_close(logits(hf_alone, input_ids), logits(model, input_ids))


def test_a_prompt_then_lora_stack_trains(llama, input_ids):
    model = get_peft_model(llama, stack([PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), lora()]))
    losses = train_steps(model, input_ids, steps=6)
    assert losses[-1] < losses[0]


def test_two_loras_stacked_and_one_deleted_from_the_middle(llama_dir, input_ids):
    torch.manual_seed(1)
    model = get_peft_model(tiny_model("llama", llama_dir), stack([lora(), lora(r=2), ia3()]))
    assert model.active_adapters == ["lora", "lora-2", "ia3"]
    model.delete_adapter("lora-2")
    assert model.active_adapters == ["lora", "ia3"]
    remaining = logits(model, input_ids)
    torch.manual_seed(1)
    by_hand = get_peft_model(tiny_model("llama", llama_dir), lora(), "lora")
    by_hand.add_adapter("lora-2", lora(r=2))
    by_hand.add_adapter("ia3", ia3())
    by_hand.delete_adapter("lora-2")
    by_hand.set_adapter(["lora", "ia3"])
    torch.testing.assert_close(remaining, logits(by_hand, input_ids))


def test_separately_trained_adapters_activate_together(llama_dir, input_ids, tmp_path):
    for name, config in (("task", lora()), ("language", ia3())):
        trained = get_peft_model(tiny_model("llama", llama_dir), config, name)
        train_steps(trained, input_ids, steps=2)
        trained.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "task", adapter_name="task")
    model.load_adapter(tmp_path / "language", adapter_name="language")
    model.set_adapter(stack(["task", "language"]))
    both = logits(model, input_ids)
    model.set_adapter("task")
    assert (both - logits(model, input_ids)).abs().max() > 1e-4
    model.set_adapter(["task", "language"])
    torch.testing.assert_close(logits(model, input_ids), both)


def test_merge_and_unload_merges_what_it_can_and_never_drops_a_soft_prompt(llama, input_ids):
    model = get_peft_model(llama, stack([lora(), ia3(), PrefixTuningConfig(num_virtual_tokens=2)]))
    expected = logits(model, input_ids)
    with pytest.raises(PeftError, match=r"\['prefix-tuning'\] act on the model's inputs"):
        model.merge_and_unload()
    assert model.active_adapters == ["lora", "ia3", "prefix-tuning"]  # nothing happened
    torch.testing.assert_close(logits(model, input_ids), expected)
    kept = model.merge_and_unload(keep_unmergeable=True)
    assert isinstance(kept, PeftModel) and list(kept.peft_config) == ["prefix-tuning"]
    assert not any(".adapters." in n for n, _ in kept.named_parameters())
    torch.testing.assert_close(logits(kept, input_ids), expected, atol=1e-5, rtol=1e-4)


def test_layer_methods_merge_as_a_stack(llama, input_ids):
    model = get_peft_model(llama, stack([lora(), ia3()]))
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["../escape", "a/b", "a.b", "", "/abs"])
def test_unsafe_member_names_are_refused(name):
    with pytest.raises(PeftError, match="not a valid adapter name"):
        stack([lora(), ia3()], names=[name, "fine"])


def test_a_manifest_naming_a_folder_outside_is_refused(llama, tmp_path):
    (tmp_path / "peft_stack.json").write_text(json.dumps({"adapters": ["../../etc"]}))
    with pytest.raises(AdapterLoadError, match="not a valid adapter name"):
        PeftModel.from_pretrained(llama, tmp_path)


# --- a method from a package of its own -------------------------------------------------------------------

THIRD_PARTY = {
    "pyproject.toml": """
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "peft-gain"
        version = "0.0.1"
        dependencies = []

        [project.entry-points.peft_core]
        gain = "peft_gain"

        [tool.hatch.build.targets.wheel]
        packages = ["peft_gain"]
    """,
    "peft_gain/__init__.py": '''
        """A method nobody here wrote: a learned gain per output channel, added as (1 + g) * out."""
        from dataclasses import dataclass

        import torch
        from peft_core import Adapter, LayerConfig, LayerTable, Method, hookimpl, inject_adapters


        @dataclass
        class GainConfig(LayerConfig):
            PEFT_TYPE = "GAIN"


        class Gain(Adapter):
            SAVED_NAMES = {"gain": "gain"}

            def __init__(self, base, config, adapter_name, module_name):
                super().__init__()
                self.gain = torch.nn.Parameter(0.1 * torch.randn(base.out_features))

            def forward(self, x, out):
                return out * (1 + self.gain)


        TABLE = LayerTable({"torch.nn.modules.linear.Linear": Gain})


        @hookimpl
        def peft_register_methods(register):
            register(Method(name="gain", peft_type="GAIN", config_class=GainConfig))


        @hookimpl
        def peft_inject(model, config, adapter_name):
            if isinstance(config, GainConfig):
                return inject_adapters(model, config, adapter_name, TABLE)
    ''',
}


@pytest.fixture
def gain_plugin(tmp_path_factory):
    """The package above, built and pip-installed into a folder of its own put on sys.path."""
    source, site = tmp_path_factory.mktemp("peft-gain"), tmp_path_factory.mktemp("site")
    for relative, text in THIRD_PARTY.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_text(textwrap.dedent(text).lstrip())
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        check=True,
    )
    sys.path.insert(0, str(site))
    reset_registry()
    try:
        yield __import__("peft_gain")
    finally:
        sys.path.remove(str(site))
        for module in [m for m in sys.modules if m.startswith("peft_gain")]:
            del sys.modules[module]
        reset_registry()


def test_an_installed_third_party_method_composes_in_a_stack(gain_plugin, llama, llama_dir, input_ids, tmp_path):
    import peft_core

    assert [m.package for m in peft_core.methods() if m.name == "gain"] == ["peft-gain"]
    model = get_peft_model(llama, stack([lora(), gain_plugin.GainConfig(target_modules=["o_proj"])]))
    assert model.active_adapters == ["lora", "gain"]
    losses = train_steps(model, input_ids, steps=5)
    assert losses[-1] < losses[0]
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "gain" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), expected)
