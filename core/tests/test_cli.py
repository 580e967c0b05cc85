"""The ``peft`` command: methods, inspect, merge and convert, in-process through ``main`` and once through
the installed executable."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft_core import PeftError, PeftModel, get_peft_model, stack
from peft_core.cli import main
from peft_core.serialization import read_config_dict, read_weights
from peft_core.testing import strip_checksums
from peft_core.testing.commands import one_line_error, run_peft
from peft_core.testing.models import tiny_model
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scale_method import ScaleConfig

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # A wrong path must fail at once, not after the Hub client's retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _trained(model: PeftModel) -> PeftModel:
    """Non-zero B factors, so a merge changes the weights and a lost factor changes the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


@pytest.fixture
def adapter_dir(llama, tmp_path) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"v_proj": 2}, task_type="CAUSAL_LM")
    _trained(get_peft_model(llama, config)).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"




# --- methods ---------------------------------------------------------------------------------------


def test_methods_json_lists_installed_and_registered_methods(capsys):
    code, out, _ = run_peft(capsys, "methods", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["lora"] == {"name": "lora", "peft_type": "LORA", "package": "peft-lora", "version": "0.1.0",
                            "state": "loaded"}
    assert rows["ia3"]["peft_type"] == "IA3"
    assert rows["scale"]["state"] == "loaded"  # the test plugin registered by conftest


def test_methods_shows_refused_plugins_with_reason(capsys, monkeypatch):
    from peft_core.plugins import Method, registry

    monkeypatch.setattr(registry(), "refused", [
        Method(name="bad", peft_type="", config_class=None, package="peft-bad", version="9", broken="API 2"),
    ])
    code, out, _ = run_peft(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "PEFT_TYPE", "PACKAGE", "VERSION", "STATE"]
    assert any(line.split()[:3] == ["lora", "LORA", "peft-lora"] and line.endswith("loaded") for line in lines)
    assert lines[-1].split() == ["bad", "-", "peft-bad", "9", "broken:", "API", "2"]
    code, out, _ = run_peft(capsys, "methods", "--json")
    assert json.loads(out)[-1]["state"] == "broken: API 2"


# --- inspect ---------------------------------------------------------------------------------------


def test_inspect_json_matches_the_saved_adapter(capsys, adapter_dir):
    code, out, _ = run_peft(capsys, "inspect", str(adapter_dir), "--json")
    assert code == 0
    info = json.loads(out)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["tensors"] == len(tensors) == 2 * 2 * len(TARGETS)
    assert info["file_size"] == (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert info["peft_type"] == "LORA" and info["task_type"] == "CAUSAL_LM"
    assert sorted(info["target_modules"]) == sorted(TARGETS)
    assert info["r"] == 4 and info["rank_pattern"] == {"v_proj": 2}
    assert info["ranks_in_file"] == [2, 4]
    assert info["dtypes"] == ["float32"]
    assert info["base_model"] == read_config_dict(adapter_dir)["base_model_name_or_path"]


def test_inspect_reads_a_legacy_bin_only_when_allowed(capsys, adapter_dir):
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    capsys.readouterr()
    code, _, err = run_peft(capsys, "inspect", str(adapter_dir), "--json")
    assert code == 1 and "--allow-legacy-bin" in one_line_error(err, "inspect")
    code, out, _ = run_peft(capsys, "inspect", str(adapter_dir), "--json", "--allow-legacy-bin")
    assert code == 0 and json.loads(out)["parameters"] == sum(t.numel() for t in tensors.values())


def test_merge_reads_a_legacy_bin_only_when_allowed(capsys, adapter_dir, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    expected = PeftModel.from_pretrained(tiny_model("llama", llama_dir), adapter_dir).merge_and_unload()
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    argv = ["merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "merged")]
    capsys.readouterr()
    code, _, err = run_peft(capsys, *argv)
    assert code == 1 and "--allow-legacy-bin" in one_line_error(err, "merge")
    assert not (tmp_path / "merged").exists()
    code, _, _ = run_peft(capsys, *argv, "--allow-legacy-bin")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert code == 0
    torch.testing.assert_close(merged.state_dict(), expected.state_dict())


def test_inspect_text_output(capsys, adapter_dir):
    code, out, _ = run_peft(capsys, "inspect", str(adapter_dir))
    assert code == 0
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines()}
    assert fields["peft_type"] == "LORA"
    total = sum(t.numel() for t in read_weights(adapter_dir).values())
    assert fields["parameters"] == f"{total:,}"


def test_inspect_reports_integrity_and_the_base_tensors_an_adapter_replaces(capsys, adapter_dir, gpt2, tmp_path):
    def fields(path: Path) -> dict[str, str]:
        code, out, _ = run_peft(capsys, "inspect", str(path))
        assert code == 0
        return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines()}

    assert fields(adapter_dir)["integrity"] == "verified"
    assert fields(adapter_dir)["replaces_base_tensors"] == "none"

    config = adapter_dir / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": 9'))
    assert fields(adapter_dir)["integrity"].startswith("MISMATCH: ")  # described, not refused: it is a diagnosis
    strip_checksums(adapter_dir)
    assert fields(adapter_dir)["integrity"] == "unrecorded"

    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only")).save_pretrained(tmp_path / "b")
    replaced = fields(tmp_path / "b")["replaces_base_tensors"].split(", ")
    assert replaced == [f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)]


def test_inspect_stack_and_soft_prompt(capsys, llama, tmp_path):
    from peft_prompt_tuning import PromptTuningConfig

    members = [LoraConfig(r=2, target_modules=["q_proj"]), IA3Config(target_modules=["down_proj"],
                                                                        feedforward_modules=["down_proj"])]
    get_peft_model(llama, stack(members)).save_pretrained(tmp_path / "stack")
    code, out, _ = run_peft(capsys, "inspect", str(tmp_path / "stack"), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["stack"] == ["lora", "ia3"]
    assert [m["peft_type"] for m in info["members"]] == ["LORA", "IA3"]
    counts = [sum(t.numel() for t in load_file(tmp_path / "stack" / n / "adapter_model.safetensors").values())
              for n in ("lora", "ia3")]
    assert [m["parameters"] for m in info["members"]] == counts
    assert info["parameters"] == sum(counts)
    assert info["members"][0]["r"] == 2

    prompt = get_peft_model(tiny_model("llama", tmp_path / "base"),
                            PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    prompt.save_pretrained(tmp_path / "prompt")
    code, out, _ = run_peft(capsys, "inspect", str(tmp_path / "prompt"), "--json")
    assert json.loads(out)["num_virtual_tokens"] == 5
    assert json.loads(out)["parameters"] == 5 * 64


@pytest.fixture
def scale_dir(llama, tmp_path) -> Path:
    """An adapter of the test-only method, which peft-core knows only through its hooks."""
    model = get_peft_model(llama, ScaleConfig(target_modules=["q_proj", "v_proj"], init_value=1.5))
    model.save_pretrained(tmp_path / "scale")
    return tmp_path / "scale"


def test_inspect_shows_what_the_methods_plugin_describes(capsys, scale_dir):
    code, out, _ = run_peft(capsys, "inspect", str(scale_dir), "--json")
    info = json.loads(out)
    assert code == 0 and info["peft_type"] == "TEST_SCALE"
    assert info["scaled_layers"] == 2 * 2  # q_proj and v_proj of the two layers, from peft_describe
    assert info["parameters"] == sum(t.numel() for t in read_weights(scale_dir).values())  # the core's count wins
    code, out, _ = run_peft(capsys, "inspect", str(scale_dir))
    assert "scaled_layers:  4" in out.splitlines()


def test_inspect_reports_a_failing_description_instead_of_failing(capsys, scale_dir, monkeypatch):
    from peft_core.plugins import registry

    def broken(hook: str, **kwargs):
        raise RuntimeError("cannot read this file")

    monkeypatch.setattr(registry(), "first_answer", broken)
    code, out, _ = run_peft(capsys, "inspect", str(scale_dir), "--json")
    info = json.loads(out)
    assert code == 0 and info["description_error"] == "peft_describe failed: RuntimeError: cannot read this file"
    assert info["integrity"] == "verified"


@pytest.mark.parametrize("which", ["missing", "model_dir", "not_json"])
def test_inspect_refuses_what_is_no_adapter(capsys, tmp_path, llama_dir, which):
    path = {"missing": tmp_path / "nope", "model_dir": llama_dir, "not_json": tmp_path / "bad"}[which]
    if which == "not_json":
        path.mkdir()
        (path / "adapter_config.json").write_text("{not json")
    code, out, err = run_peft(capsys, "inspect", str(path))
    assert code == 1 and out == ""
    line = one_line_error(err, "inspect")
    assert str(path) in line


def test_debug_shows_the_traceback(tmp_path):
    from peft_core.errors import AdapterLoadError

    with pytest.raises(AdapterLoadError):
        main(["--debug", "inspect", str(tmp_path / "nope")])


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--base", "x"])  # --adapter and --out missing
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- merge -----------------------------------------------------------------------------------------


def test_merge_saves_a_model_transformers_loads_with_the_same_logits(capsys, adapter_dir, llama_dir, tmp_path):
    from peft_core.testing.models import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    tiny_model("llama", base)
    tiny_tokenizer(base)
    out = tmp_path / "merged"
    code, stdout, _ = run_peft(capsys, "merge", "--base", str(base), "--adapter", str(adapter_dir), "--out", str(out))
    assert code == 0 and str(out) in stdout
    assert (out / "tokenizer.json").is_file()

    input_ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    unmerged = PeftModel.from_pretrained(tiny_model("llama", llama_dir), adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        expected = unmerged(input_ids).logits
        base_logits = tiny_model("llama", llama_dir)(input_ids).logits
        torch.testing.assert_close(merged(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base_logits, expected, atol=1e-4)  # the adapter does change the model


def test_merge_dtype_and_refusing_a_non_empty_out(capsys, adapter_dir, llama_dir, tmp_path):
    out = tmp_path / "merged"
    code, _, _ = run_peft(capsys, "merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out", str(out),
                      "--dtype", "bf16")
    assert code == 0
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}

    code, stdout, err = run_peft(capsys, "merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out",
                             str(out))
    assert code == 1 and stdout == ""
    assert "--force" in one_line_error(err, "merge")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before

    code, _, _ = run_peft(capsys, "merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out", str(out),
                      "--force")
    assert code == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}


def test_a_killed_merge_leaves_out_as_it_was_and_the_next_merge_cleans_up(adapter_dir, llama_dir, tmp_path):
    from peft_core import directory_commit
    from peft_core.cli.merge import merge

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for stop_at in ("staged", "committed"):  # before the commit, and after it, before the files are in place
        pid = os.fork()
        if pid == 0:
            def step(name: str, stop_at: str = stop_at) -> None:
                if name == stop_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            directory_commit.step = step
            try:
                merge(str(llama_dir), str(adapter_dir), out, force=True)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
        left = directory_commit.leftovers(out)
        if stop_at == "staged":
            assert len(left) == 1 and left[0].startswith(".peft-staging-")
            assert sorted(os.listdir(out)) == sorted([*left, "notes.txt"])  # no model file of the killed merge
        else:  # committed: the next writer (or reader) moves the files in
            assert left == [".peft-commit"] and (out / ".peft-commit" / "config.json").is_file()
    merge(str(llama_dir), str(adapter_dir), out, force=True)
    assert directory_commit.leftovers(out) == []
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_merge_wrong_base_is_one_line(capsys, adapter_dir, tiny_model_dir, tmp_path):
    import transformers

    gpt2 = tiny_model_dir("gpt2")  # no q_proj / v_proj: target modules missing
    code, _, err = run_peft(capsys, "merge", "--base", str(gpt2), "--adapter", str(adapter_dir), "--out",
                        str(tmp_path / "a"))
    line = one_line_error(err, "merge")
    assert code == 1 and "does not fit the base model" in line and "q_proj" in line

    wide = tmp_path / "wide-llama"  # same module names, other shapes
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128,
    )).save_pretrained(wide)
    code, _, err = run_peft(capsys, "merge", "--base", str(wide), "--adapter", str(adapter_dir), "--out",
                        str(tmp_path / "b"))
    line = one_line_error(err, "merge")
    assert code == 1 and "shape" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    code, _, err = run_peft(capsys, "merge", "--base", str(tmp_path / "nope"), "--adapter", str(adapter_dir), "--out",
                        str(tmp_path / "c"))
    assert code == 1 and "nope" in one_line_error(err, "merge")


def test_merge_refuses_an_adapter_of_an_unknown_method(capsys, adapter_dir, llama_dir, tmp_path):
    strip_checksums(adapter_dir)  # a foreign adapter
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "NO_SUCH_METHOD"}))
    code, _, err = run_peft(capsys, "merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out",
                        str(tmp_path / "out"))
    assert code == 1 and "NO_SUCH_METHOD" in one_line_error(err, "merge")


@pytest.mark.parametrize(("task_type", "architectures", "expected"), [
    ("SEQ_CLS", ["LlamaForCausalLM"], "AutoModelForSequenceClassification"),
    (None, ["GPT2LMHeadModel"], "AutoModelForCausalLM"),
    (None, ["T5ForConditionalGeneration"], "AutoModelForSeq2SeqLM"),
    (None, ["BertForTokenClassification"], "AutoModelForTokenClassification"),
    (None, None, "AutoModelForCausalLM"),
])
def test_auto_class_choice(task_type, architectures, expected):
    from peft_core.cli.merge import auto_class_name

    assert auto_class_name(task_type, architectures) == expected


# --- convert ---------------------------------------------------------------------------------------
# Through a format defined here: the core converts with whatever format the registry holds.


def _export_one_file(saved, destination: str, options: dict) -> str:
    file = Path(destination, f"{options.get('label', 'adapter')}.safetensors")
    if file.exists() and not options["force"]:
        raise PeftError(f"{file} exists; pass --force to overwrite it.")
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(saved.tensors, file, metadata={"config": json.dumps(saved.config)})
    return str(file)


def _import_one_file(source: str, destination: str, options: dict) -> str:
    from peft_core.serialization import save_adapter

    with safe_open(source, "pt") as f:
        config, tensors = f.metadata()["config"], {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_adapter(destination, config, tensors)
    return destination


def _label_option(parser) -> None:
    parser.add_argument("--label", default="adapter", help="the file's name, without .safetensors")


def _format(name: str, add_arguments=_label_option):
    from peft_core.plugins import AdapterFormat

    return AdapterFormat(name=name, description=f"{name} for tests", export=_export_one_file,
                         import_=_import_one_file, add_arguments=add_arguments, package="tests")


@pytest.fixture
def formats(monkeypatch):
    """Installs exactly the formats given: ``formats("a", "b")``; the first has the option --label."""
    from peft_core.plugins import registry

    def install(*names: str) -> None:
        monkeypatch.setattr(registry(), "formats", {
            name: _format(name, _label_option if i == 0 else None) for i, name in enumerate(names)
        })

    return install


def test_convert_round_trip_through_a_registered_format(capsys, scale_dir, formats, tmp_path):
    formats("one-file")
    convert = ("convert", "--to", "one-file", str(scale_dir), str(tmp_path / "out"), "--label", "x")
    code, out, _ = run_peft(capsys, *convert)
    file = tmp_path / "out" / "x.safetensors"  # the format's own option reached it
    assert code == 0 and out.strip() == f"converted {scale_dir} to the one-file format: {file}"
    code, _, err = run_peft(capsys, *convert)
    assert code == 1 and "--force" in one_line_error(err, "convert")  # --force reaches the format too
    # One format installed: --from may be left out.
    code, _, _ = run_peft(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "back"))
    assert code == 0
    assert read_config_dict(tmp_path / "back") == read_config_dict(scale_dir)
    original, back = read_weights(scale_dir), read_weights(tmp_path / "back")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    code, _, err = run_peft(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "back"))
    assert code == 1 and "--force" in one_line_error(err, "convert")
    assert run_peft(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "back"), "--force")[0] == 0


def test_convert_to_peft_of_an_adapter_already_in_the_peft_format_says_so(capsys, scale_dir, formats, tmp_path):
    formats("one-file")
    code, _, err = run_peft(capsys, "convert", "--to", "peft", str(scale_dir), str(tmp_path / "p"))
    line = one_line_error(err, "convert")
    assert code == 1 and f"{scale_dir} is already in the PEFT format" in line and "--to with one of: one-file" in line
    assert not (tmp_path / "p").exists()


def test_convert_formats_and_their_options_come_from_the_registry(capsys, scale_dir, formats, tmp_path):
    formats("one-file", "two-file")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "peft, one-file, two-file" in help_text and "options of the one-file format" in help_text
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--to", "kohya", str(scale_dir), str(tmp_path / "y")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no installed plugin provides the format 'kohya' (installed: peft, one-file, two-file)" in err

    run_peft(capsys, "convert", "--to", "one-file", str(scale_dir), str(tmp_path / "out"))
    code, _, err = run_peft(capsys, "convert", "--to", "peft", str(tmp_path / "out" / "adapter.safetensors"),
                        str(tmp_path / "p"))
    assert code == 1 and "Several formats are installed (one-file, two-file); pass --from" in err
    code, _, _ = run_peft(capsys, "convert", "--to", "peft", "--from", "two-file",
                      str(tmp_path / "out" / "adapter.safetensors"), str(tmp_path / "p"))
    assert code == 0
    code, _, err = run_peft(capsys, "convert", "--to", "one-file", "--from", "two-file", str(scale_dir),
                        str(tmp_path / "q"))
    assert code == 1 and "Drop --from" in one_line_error(err, "convert")


def test_convert_without_formats_and_with_clashing_options(capsys, scale_dir, formats, monkeypatch, tmp_path):
    from peft_core.errors import PluginError
    from peft_core.plugins import registry

    formats()
    code, _, err = run_peft(capsys, "convert", "--to", "peft", str(tmp_path / "x.safetensors"), str(tmp_path / "p"))
    assert code == 1 and "No installed plugin provides a format" in one_line_error(err, "convert")
    monkeypatch.setattr(registry(), "formats", {"one-file": _format("one-file"), "other": _format("other")})
    with pytest.raises(PluginError, match="The other format of tests adds a `peft convert` option"):
        main(["convert", "--to", "peft", str(scale_dir), str(tmp_path / "p")])


def _set_init_value_text(directory: Path) -> None:
    text = (directory / "adapter_config.json").read_text()
    (directory / "adapter_config.json").write_text(re.sub(r'"init_value": [^,}]+', '"init_value": "big"', text))


def _truncate_weights(directory: Path) -> None:
    file = directory / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])


@pytest.mark.parametrize(("edit", "message"), [
    (_set_init_value_text, "init_value"),
    (_truncate_weights, "truncated or corrupt"),
], ids=["invalid-config", "truncated-weights"])
def test_convert_reads_and_checks_an_adapter_as_the_loader_does(capsys, scale_dir, formats, tmp_path, edit, message):
    """What the loader refuses, convert refuses too, before the format writes anything."""
    formats("one-file")
    strip_checksums(scale_dir)  # a file from elsewhere
    edit(scale_dir)
    with pytest.raises(PeftError, match=message):
        PeftModel.from_pretrained(tiny_model("llama", tmp_path / "base"), scale_dir)
    code, _, err = run_peft(capsys, "convert", "--to", "one-file", str(scale_dir), str(tmp_path / "d"))
    assert code == 1 and message in one_line_error(err, "convert")
    assert not (tmp_path / "d").exists()


def test_convert_refuses_a_stack(capsys, llama, formats, tmp_path):
    formats("one-file")
    get_peft_model(llama, stack([ScaleConfig(target_modules=["q_proj"]), ScaleConfig(target_modules=["v_proj"])])
                   ).save_pretrained(tmp_path / "stack")
    code, _, err = run_peft(capsys, "convert", "--to", "one-file", str(tmp_path / "stack"), str(tmp_path / "d"))
    assert code == 1 and "is a stack of adapters" in one_line_error(err, "convert")


# --- the installed executable ----------------------------------------------------------------------


def test_the_peft_executable(adapter_dir, tmp_path):
    executable = Path(sys.executable).with_name("peft")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([executable, "inspect", str(adapter_dir), "--json"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["parameters"] == sum(t.numel() for t in read_weights(adapter_dir).values())

    done = subprocess.run([executable, "inspect", str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr

    done = subprocess.run([executable, "--debug", "inspect", str(tmp_path / "nope")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr and "AdapterLoadError" in done.stderr
