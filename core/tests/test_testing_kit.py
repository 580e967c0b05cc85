"""peft_core.testing as a plugin author meets it: tiny models kept out of the working directory and never
loaded as another kind, and pytest fixtures that appear only in projects that enable them."""

from __future__ import annotations

import pytest
from peft_core.errors import ConfigError
from peft_core.testing import saved_tiny_model, tiny_model

pytest_plugins = ["pytester"]


def test_tiny_models_without_a_directory_are_kept_apart_by_kind_outside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    assert type(llama).__name__ == "LlamaForCausalLM" and type(gpt2).__name__ == "GPT2LMHeadModel"
    assert type(tiny_model("llama")).__name__ == "LlamaForCausalLM"  # asked again: still a Llama
    assert list(tmp_path.iterdir()) == []
    folders = {saved_tiny_model("llama"), saved_tiny_model("gpt2"), saved_tiny_model("llama", seed=1)}
    assert len(folders) == 3 and not any(tmp_path in folder.parents for folder in folders)


def test_a_directory_holding_another_model_is_refused(tmp_path):
    tiny_model("gpt2", tmp_path / "base")
    with pytest.raises(ConfigError, match=r"holds the tiny 'gpt2' model with seed 0, not the tiny 'llama' model"):
        tiny_model("llama", tmp_path / "base")
    with pytest.raises(ConfigError, match=r"not the tiny 'gpt2' model with seed 1"):
        tiny_model("gpt2", tmp_path / "base", seed=1)
    assert type(tiny_model("gpt2", tmp_path / "base")).__name__ == "GPT2LMHeadModel"

    tiny_model("llama", tmp_path / "mine").save_pretrained(tmp_path / "foreign")  # saved by someone else
    with pytest.raises(ConfigError, match="a model that tiny_model did not save"):
        tiny_model("llama", tmp_path / "foreign")
    with pytest.raises(ConfigError, match="No tiny model of kind 'mistral'; the kinds are bert-classifier, gpt2"):
        tiny_model("mistral")


def test_fixtures_are_opt_in(pytester):
    """A project with peft-core installed sees no `llama` fixture until it enables peft_core.testing.fixtures."""
    pytester.makepyfile(test_uses_llama="def test_it(llama):\n    assert type(llama).__name__ == 'LlamaForCausalLM'\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'llama' not found*"])

    pytester.makeconftest('pytest_plugins = ["peft_core.testing.fixtures"]\n')
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_conformance_suite_needs_no_opt_in(pytester):
    """Its checks get ``tiny_model_dir`` with their parametrisation, from the plugin every install activates."""
    pytester.makepyfile(test_conformance='''
from peft_core.testing.conformance import MethodConformance
from peft_lora import LoraConfig


class TestLora(MethodConformance):
    models = ("llama", "gpt2")

    def config(self, kind):
        return LoraConfig(r=2, target_modules=["q_proj"] if kind == "llama" else ["c_attn"], task_type="CAUSAL_LM")
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "save_and_load", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_save_and_load_give_equal_outputs?llama? PASSED*"])
