"""LoRA trained by 2 CPU processes (gloo) with DDP, FSDP2 (``fully_shard``) and FSDP1 equals one process.

``torchrun`` starts tests/distributed_worker.py once for all three strategies; each rank trains on half of
a fixed global batch. The parent trains the same model on the whole batch in one process, then checks, per
strategy: both ranks end with the same adapter; it, the per-step losses and gradient norms equal the
single-process run's; only the adapter trains and FSDP shards the frozen base; the adapter rank 0 saved is
in our format and loads with equal logits. ``accelerate launch`` runs the DDP training identically.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft_core import PeftModel
from peft_core.testing import tiny_model
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 120


def _load_worker():
    # Imported by path: tests/ is no package. The parent shares only the model, data and hyperparameters
    # with the worker, not its training loop or its wrapping.
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()
STRATEGIES = list(worker.STRATEGIES)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("distributed_base")
    tiny_model("llama", directory)  # built and saved once here; the ranks only load it
    return directory


def launch(launcher: list[str], output: Path, base_dir: Path, strategies: list[str]) -> Path:
    """Run the worker on 2 processes with ``launcher``; fail with the end of its log if it fails or hangs."""
    command = [*launcher, str(WORKER), "--output", str(output), "--base-model", str(base_dir),
               "--strategy", *strategies]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    # A session of its own, so that on a timeout the launcher and both ranks go down together.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"{command} did not finish within {TIMEOUT_S} s (a rank hung in a collective?):\n{log[-6000:]}")
    assert process.returncode == 0, f"{command} failed ({process.returncode}):\n{log[-6000:]}"
    return output


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory) -> Path:
    """The output folder of one ``torchrun`` of the worker over every strategy."""
    # --standalone: a free port of its own, so that concurrent test runs do not meet in one rendezvous.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return launch(torchrun, tmp_path_factory.mktemp("distributed_runs"), base_dir, STRATEGIES)


@pytest.fixture(scope="module")
def reference(base_dir, tmp_path_factory) -> dict:
    """One process, the whole global batch, the same optimizer and steps; its adapter saved the plain way."""
    model = worker.build_model(base_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=worker.LEARNING_RATE)
    batch = worker.global_batch()
    model.train()
    losses, gradient_norms = [], []
    for _ in range(worker.STEPS):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        gradient_norms.append(torch.nn.utils.clip_grad_norm_(params, float("inf")).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    saved = tmp_path_factory.mktemp("distributed_reference")
    model.save_pretrained(saved)
    with torch.no_grad():
        logits = model(input_ids=probe()).logits
    return {
        "losses": losses, "gradient_norms": gradient_norms, "logits": logits, "saved": saved,
        "adapter": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "frozen_total": sum(p.numel() for p in model.parameters() if not p.requires_grad),
    }


def probe() -> torch.Tensor:
    """Inputs for comparing logits, other than the training batch."""
    return torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(5))


def rank_results(runs: Path, strategy: str) -> list[dict]:
    return [torch.load(runs / strategy / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_both_ranks_end_with_the_same_trained_adapter(runs, reference, strategy):
    ranks = rank_results(runs, strategy)
    assert sorted(ranks[0]["adapter"]) == sorted(ranks[1]["adapter"]) == sorted(reference["adapter"])
    for name, tensor in ranks[0]["adapter"].items():
        assert torch.equal(tensor, ranks[1]["adapter"][name]), f"{name} differs between the ranks"
    # Same on both ranks because it trained, not because nothing moved: B starts at zero.
    lora_b = [t for n, t in ranks[0]["adapter"].items() if ".lora_B." in n]
    assert lora_b and all(t.abs().max() > 1e-3 for t in lora_b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_the_adapter_trains_and_fsdp_shards_the_frozen_base(runs, reference, strategy):
    ranks = rank_results(runs, strategy)
    for result in ranks:
        assert result["trainable"] == sorted(reference["adapter"])
        assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in result["trainable"])
    held = [result["frozen_held"] for result in ranks]
    total = reference["frozen_total"]
    assert all(result["frozen_total"] == total for result in ranks)
    if strategy == "ddp":
        assert held == [total, total]  # a full replica on every rank
    else:
        # Each rank keeps only its part of every frozen weight, and together they hold all of it once.
        assert all(h < 0.6 * total for h in held), held
        assert sum(held) == total


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_equals_one_process_on_the_global_batch(runs, reference, strategy):
    ranks = rank_results(runs, strategy)
    # The ranks' mean losses, averaged: the mean loss of the global batch at every step.
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(reference["losses"]))
    assert reference["losses"][-1] < reference["losses"][0] - 0.1
    # AdamW's step hardly depends on the gradient's scale, so a sum over ranks where a mean belongs would
    # pass the weight check below; the norm of the gradient the optimizer got would not.
    torch.testing.assert_close(torch.tensor(ranks[0]["gradient_norms"]), torch.tensor(reference["gradient_norms"]),
                               rtol=1e-4, atol=0)
    assert min(reference["gradient_norms"]) > 0.1
    # Two half-batch gradients averaged round differently from one whole-batch gradient, and AdamW divides
    # by the gradient's running magnitude, so small gradients pass that on: 4 steps of lr 1e-2 ended up to
    # 1.3e-5 apart. 1e-4 is 1% of one step.
    for name, expected in reference["adapter"].items():
        torch.testing.assert_close(ranks[0]["adapter"][name], expected, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_adapter_rank0_saved_loads_with_equal_logits(runs, reference, base_dir, strategy):
    saved = runs / strategy / "adapter"
    # The same files as a single-process save_pretrained: our format, no wrapper names in the keys.
    assert sorted(load_file(saved / "adapter_model.safetensors")) == \
        sorted(load_file(reference["saved"] / "adapter_model.safetensors"))
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config == json.loads((reference["saved"] / "adapter_config.json").read_text())

    loaded = PeftModel.from_pretrained(tiny_model("llama", base_dir), saved)
    base = tiny_model("llama", base_dir)
    with torch.no_grad():
        logits = loaded(input_ids=probe()).logits
        base_logits = base(input_ids=probe()).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-5)
    assert (logits - base_logits).abs().max() > 1e-2  # the loaded adapter is the trained one, not a no-op


def test_accelerate_launch_runs_the_same_ddp_training(runs, base_dir, tmp_path):
    # accelerate's torchrun launcher is --multi_gpu even on CPUs (--cpu starts one plain process, which
    # finds no RANK to join with); port 0 picks a free one.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "0"]
    output = launch(accelerate, tmp_path, base_dir, ["ddp"])
    for rank in range(2):
        ours = torch.load(output / "ddp" / f"rank{rank}.pt", weights_only=True)
        theirs = torch.load(runs / "ddp" / f"rank{rank}.pt", weights_only=True)
        assert ours["losses"] == theirs["losses"]
        assert all(torch.equal(ours["adapter"][n], theirs["adapter"][n]) for n in theirs["adapter"])
    saved, expected = (load_file(d / "ddp" / "adapter" / "adapter_model.safetensors") for d in (output, runs))
    assert sorted(saved) == sorted(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
