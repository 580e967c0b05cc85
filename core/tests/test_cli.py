"""The ``peft`` command: methods, inspect, merge and convert, in-process through ``main`` and once through
the installed executable."""

from __future__ import annotations

import json
import math
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
from peft_core.integrations.diffusers import LORA_WEIGHT_NAME, METADATA_KEY, save_diffusers_lora
from peft_core.serialization import read_config_dict, read_weights
from peft_core.testing import strip_checksums
from peft_core.testing.models import tiny_model
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"peft {command}: error: ")
    assert "Traceback" not in err
    return lines[0]


# --- methods ---------------------------------------------------------------------------------------


def test_methods_json_lists_installed_and_registered_methods(capsys):
    code, out, _ = _run(capsys, "methods", "--json")
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
    code, out, _ = _run(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "PEFT_TYPE", "PACKAGE", "VERSION", "STATE"]
    assert any(line.split()[:3] == ["lora", "LORA", "peft-lora"] and line.endswith("loaded") for line in lines)
    assert lines[-1].split() == ["bad", "-", "peft-bad", "9", "broken:", "API", "2"]
    code, out, _ = _run(capsys, "methods", "--json")
    assert json.loads(out)[-1]["state"] == "broken: API 2"


# --- inspect ---------------------------------------------------------------------------------------


def test_inspect_json_matches_the_saved_adapter(capsys, adapter_dir):
    code, out, _ = _run(capsys, "inspect", str(adapter_dir), "--json")
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
    code, _, err = _run(capsys, "inspect", str(adapter_dir), "--json")
    assert code == 1 and "--allow-legacy-bin" in _one_line_error(err, "inspect")
    code, out, _ = _run(capsys, "inspect", str(adapter_dir), "--json", "--allow-legacy-bin")
    assert code == 0 and json.loads(out)["parameters"] == sum(t.numel() for t in tensors.values())


def test_merge_reads_a_legacy_bin_only_when_allowed(capsys, adapter_dir, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    expected = PeftModel.from_pretrained(tiny_model("llama", llama_dir), adapter_dir).merge_and_unload()
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    argv = ["merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "merged")]
    capsys.readouterr()
    code, _, err = _run(capsys, *argv)
    assert code == 1 and "--allow-legacy-bin" in _one_line_error(err, "merge")
    assert not (tmp_path / "merged").exists()
    code, _, _ = _run(capsys, *argv, "--allow-legacy-bin")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert code == 0
    torch.testing.assert_close(merged.state_dict(), expected.state_dict())


def test_inspect_text_output(capsys, adapter_dir):
    code, out, _ = _run(capsys, "inspect", str(adapter_dir))
    assert code == 0
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines()}
    assert fields["peft_type"] == "LORA"
    total = sum(t.numel() for t in read_weights(adapter_dir).values())
    assert fields["parameters"] == f"{total:,}"


def test_inspect_reports_integrity_and_the_base_tensors_an_adapter_replaces(capsys, adapter_dir, gpt2, tmp_path):
    def fields(path: Path) -> dict[str, str]:
        code, out, _ = _run(capsys, "inspect", str(path))
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
    code, out, _ = _run(capsys, "inspect", str(tmp_path / "stack"), "--json")
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
    code, out, _ = _run(capsys, "inspect", str(tmp_path / "prompt"), "--json")
    assert json.loads(out)["num_virtual_tokens"] == 5
    assert json.loads(out)["parameters"] == 5 * 64


@pytest.mark.parametrize("which", ["missing", "model_dir", "not_json"])
def test_inspect_refuses_what_is_no_adapter(capsys, tmp_path, llama_dir, which):
    path = {"missing": tmp_path / "nope", "model_dir": llama_dir, "not_json": tmp_path / "bad"}[which]
    if which == "not_json":
        path.mkdir()
        (path / "adapter_config.json").write_text("{not json")
    code, out, err = _run(capsys, "inspect", str(path))
    assert code == 1 and out == ""
    line = _one_line_error(err, "inspect")
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
    code, stdout, _ = _run(capsys, "merge", "--base", str(base), "--adapter", str(adapter_dir), "--out", str(out))
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
    code, _, _ = _run(capsys, "merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out", str(out),
                      "--dtype", "bf16")
    assert code == 0
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}

    code, stdout, err = _run(capsys, "merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out",
                             str(out))
    assert code == 1 and stdout == ""
    assert "--force" in _one_line_error(err, "merge")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before

    code, _, _ = _run(capsys, "merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out", str(out),
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
    code, _, err = _run(capsys, "merge", "--base", str(gpt2), "--adapter", str(adapter_dir), "--out",
                        str(tmp_path / "a"))
    line = _one_line_error(err, "merge")
    assert code == 1 and "does not fit the base model" in line and "q_proj" in line

    wide = tmp_path / "wide-llama"  # same module names, other shapes
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128,
    )).save_pretrained(wide)
    code, _, err = _run(capsys, "merge", "--base", str(wide), "--adapter", str(adapter_dir), "--out",
                        str(tmp_path / "b"))
    line = _one_line_error(err, "merge")
    assert code == 1 and "shape" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    code, _, err = _run(capsys, "merge", "--base", str(tmp_path / "nope"), "--adapter", str(adapter_dir), "--out",
                        str(tmp_path / "c"))
    assert code == 1 and "nope" in _one_line_error(err, "merge")


def test_merge_refuses_an_adapter_of_an_unknown_method(capsys, adapter_dir, llama_dir, tmp_path):
    strip_checksums(adapter_dir)  # a foreign adapter
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "NO_SUCH_METHOD"}))
    code, _, err = _run(capsys, "merge", "--base", str(llama_dir), "--adapter", str(adapter_dir), "--out",
                        str(tmp_path / "out"))
    assert code == 1 and "NO_SUCH_METHOD" in _one_line_error(err, "merge")


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


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


@pytest.fixture
def unet_adapter(tmp_path) -> tuple[PeftModel, Path]:
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_out.0", "conv1"],
                        rank_pattern={"to_k": 2}, alpha_pattern={"conv1": 3}, use_rslora=True)
    model = _trained(get_peft_model(tiny_unet(), config))
    model.save_pretrained(tmp_path / "peft")
    return model, tmp_path / "peft"


def test_convert_round_trip_without_a_model(capsys, unet_adapter, tmp_path):
    model, peft_dir = unet_adapter
    code, _, _ = _run(capsys, "convert", "--to", "diffusers", str(peft_dir), str(tmp_path / "diffusers"))
    assert code == 0
    file = tmp_path / "diffusers" / LORA_WEIGHT_NAME

    # Model-free, the file holds what the library writes from the live model.
    reference = Path(save_diffusers_lora(model, tmp_path / "reference"))
    assert load_file(file).keys() == load_file(reference).keys()
    for key, tensor in load_file(reference).items():
        assert torch.equal(load_file(file)[key], tensor)
    with safe_open(file, "pt") as ours, safe_open(reference, "pt") as theirs:
        assert json.loads(ours.metadata()[METADATA_KEY]) == json.loads(theirs.metadata()[METADATA_KEY])

    code, _, _ = _run(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "back"))
    assert code == 0
    original, back = read_weights(peft_dir), read_weights(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert read_config_dict(tmp_path / "back") == read_config_dict(peft_dir)


def test_convert_foreign_diffusers_file_rebuilds_an_equivalent_config(capsys, unet_adapter, tmp_path):
    model, _ = unet_adapter
    # Written by the library from the live model, so it has no copy of the original config.
    save_diffusers_lora(model, tmp_path / "diffusers")
    code, _, _ = _run(capsys, "convert", "--to", "peft", str(tmp_path / "diffusers"), str(tmp_path / "back"))
    assert code == 0
    config = read_config_dict(tmp_path / "back")
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False  # folded into the alphas

    sample = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10]),
              torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(2)))
    loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(loaded(*sample).sample, model.eval()(*sample).sample)


def test_convert_errors_are_one_line(capsys, adapter_dir, unet_adapter, tmp_path):
    _, peft_dir = unet_adapter
    assert _run(capsys, "convert", "--to", "diffusers", str(peft_dir), str(tmp_path / "d"))[0] == 0
    code, _, err = _run(capsys, "convert", "--to", "diffusers", str(peft_dir), str(tmp_path / "d"))
    assert code == 1 and "--force" in _one_line_error(err, "convert")
    code, _, err = _run(capsys, "convert", "--to", "peft", str(tmp_path / "d"), str(tmp_path / "p"),
                        "--component", "transformer")
    assert code == 1 and "unet" in _one_line_error(err, "convert")
    (tmp_path / "ia3").mkdir()
    get_peft_model(tiny_unet(), IA3Config(target_modules=["to_q"], feedforward_modules=[])).save_pretrained(
        tmp_path / "ia3")
    code, _, err = _run(capsys, "convert", "--to", "diffusers", str(tmp_path / "ia3"), str(tmp_path / "x"))
    assert code == 1 and "IA3" in _one_line_error(err, "convert")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--to", "kohya", str(peft_dir), str(tmp_path / "y")])
    assert exit_info.value.code == 2


def _set_alpha_nan(directory: Path) -> None:
    text = (directory / "adapter_config.json").read_text()
    (directory / "adapter_config.json").write_text(re.sub(r'"lora_alpha": [^,]+', '"lora_alpha": NaN', text))


def _set_huge_rank(directory: Path) -> None:
    text = (directory / "adapter_config.json").read_text()
    (directory / "adapter_config.json").write_text(re.sub(r'"r": \d+', '"r": 1e400', text))


def _int_factor(directory: Path) -> None:
    tensors = load_file(directory / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, directory / "adapter_model.safetensors")


@pytest.mark.parametrize(("edit", "message"), [
    (_set_alpha_nan, "lora_alpha must be a finite number"),
    (_set_huge_rank, "LoraConfig.r must be int, not float (inf)"),
    (_int_factor, "torch.int32"),
], ids=["alpha-nan", "rank-1e400", "int32-factor"])
def test_convert_reads_and_checks_an_adapter_as_the_loader_does(capsys, unet_adapter, tmp_path, edit, message):
    """What the loader refuses, convert refuses too, rather than writing a file that will not load."""
    _, peft_dir = unet_adapter
    strip_checksums(peft_dir)  # a file from elsewhere
    edit(peft_dir)
    with pytest.raises(PeftError, match=re.escape(message)):
        PeftModel.from_pretrained(tiny_unet(), peft_dir)
    code, _, err = _run(capsys, "convert", "--to", "diffusers", str(peft_dir), str(tmp_path / "d"))
    assert code == 1 and message in _one_line_error(err, "convert")
    assert not (tmp_path / "d" / LORA_WEIGHT_NAME).exists()


def test_convert_from_diffusers_refuses_what_would_not_load(capsys, unet_adapter, tmp_path):
    model, _ = unet_adapter
    file = Path(save_diffusers_lora(model, tmp_path / "diffusers"))
    with safe_open(file, "pt") as f:
        header = f.metadata()
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    save_file({**tensors, key: tensors[key].to(torch.int32)}, file, metadata=header)
    code, _, err = _run(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "p"))
    assert code == 1 and "is stored as torch.int32" in _one_line_error(err, "convert")

    metadata = json.loads(header[METADATA_KEY])
    save_file(tensors, file, metadata={**header, METADATA_KEY: json.dumps({**metadata, "unet.lora_alpha": math.nan})})
    code, _, err = _run(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "p"))
    assert code == 1 and "lora_alpha must be a finite number" in _one_line_error(err, "convert")

    deep = '{"unet": ' + "[" * 100_000 + "]" * 100_000 + "}"
    save_file(tensors, file, metadata={**header, METADATA_KEY: deep})
    code, _, err = _run(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "p"))
    assert code == 1 and "nest thousands of levels deep" in _one_line_error(err, "convert")
    assert not (tmp_path / "p" / "adapter_config.json").exists()


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
