"""An adapter on disk changes as one unit: a save killed at any moment, two saves into one folder at once, or a
reader during a save never yields (or loads) one save's config with another's weights, and killed saves leave
nothing behind once the next save has run.

The writers are forked processes killed with SIGKILL, as the kernel or an out-of-memory killer does it: no
``finally`` runs, no file is closed."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from peft_core import AdapterLoadError, PeftModel, get_peft_model, stack
from peft_core import directory_commit as commit
from peft_core.directory_commit import leftovers
from peft_core.serialization import read_adapter
from peft_core.testing import tiny_model
from peft_ia3 import IA3Config
from peft_lora import LoraConfig

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="SIGKILL trials fork writer processes (POSIX)")

IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


def lora(llama_dir: Path, alpha: float, seed: int) -> PeftModel:
    """A LoRA adapter with random factors; the two of a trial share shapes and differ in weights and alpha."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model("llama", llama_dir), LoraConfig(
        r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
    ))
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, PeftModel]:
    llama_dir = tmp_path_factory.mktemp("llama")
    return {"A": lora(llama_dir, alpha=8, seed=1), "B": lora(llama_dir, alpha=32, seed=2)}


@pytest.fixture(scope="module")
def expected(pair, tmp_path_factory) -> dict[str, tuple[bytes, dict[str, torch.Tensor]]]:
    """Each adapter's config bytes and tensors, as one uninterrupted save writes them."""
    found = {}
    for name, model in pair.items():
        directory = tmp_path_factory.mktemp(f"whole-{name}")
        model.save_pretrained(directory)
        saved = read_adapter(directory)
        found[name] = (Path(saved.config_file).read_bytes(), saved.tensors)
    return found


def which(directory: Path, expected: dict[str, tuple[bytes, dict[str, torch.Tensor]]]) -> str:
    """``"A"`` or ``"B"``: the whole adapter the library reads from ``directory``. Anything else fails."""
    saved = read_adapter(directory)  # verifies that config and weights belong together
    config = Path(saved.config_file).read_bytes()
    for name, (config_bytes, tensors) in expected.items():
        if config == config_bytes:
            assert saved.tensors.keys() == tensors.keys()
            assert all(torch.equal(saved.tensors[k], tensors[k]) for k in tensors), f"{name}'s config, other weights"
            return name
    raise AssertionError(f"{directory} holds neither adapter's config")


def fork(work) -> int:
    """Run ``work()`` in a forked child that never returns into pytest."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            work()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_saves_killed_at_random_moments_leave_one_whole_adapter(pair, expected, tmp_path):
    """120 kills of a process saving A and B in turn into one folder, at random moments of its saves."""
    directory = tmp_path / "adapter"
    pair["A"].save_pretrained(directory)
    start = time.perf_counter()
    pair["B"].save_pretrained(directory)
    one_save = time.perf_counter() - start

    def alternate(ready: int) -> None:
        pair["A"].save_pretrained(directory)
        os.write(ready, b"x")  # the child runs at full speed from here on (a fork's first writes are slow)
        while True:
            pair["B"].save_pretrained(directory)
            pair["A"].save_pretrained(directory)

    rng = random.Random(0)
    outcomes = {"A": 0, "B": 0}
    most_left = 0
    for trial in range(120):
        ready, signal_ready = os.pipe()
        pid = fork(lambda write_end=signal_ready: alternate(write_end))
        os.read(ready, 1)
        os.close(ready), os.close(signal_ready)
        time.sleep(rng.uniform(0, 4) * one_save)  # somewhere in the next two saves
        kill(pid)
        most_left = max(most_left, len(leftovers(directory)))
        outcomes[which(directory, expected)] += 1
        if trial % 30 == 0:  # and it loads as that adapter
            logits = PeftModel.from_pretrained(tiny_model("llama", tmp_path / "base"), directory)(IDS).logits
            torch.testing.assert_close(logits, pair[which(directory, expected)](IDS).logits)
    assert outcomes["A"] and outcomes["B"], outcomes  # the kills did land in both saves
    assert most_left <= 2  # at most one killed save's staging and one commit, never an accumulation
    pair["A"].save_pretrained(directory)
    assert leftovers(directory) == []  # the next save removed what the killed ones left


def _kill_at_step(k: int):
    """A ``directory_commit.step`` that kills the process when the ``k``-th step of a save is reached."""
    reached = []

    def step(name: str) -> None:
        reached.append(name)
        if len(reached) == k:
            os.kill(os.getpid(), signal.SIGKILL)

    return step


def _run_killed_at(k: int, save) -> bool:
    """Run ``save`` in a child killed at its ``k``-th step; whether the kill happened before it finished."""

    def work() -> None:
        commit.step = _kill_at_step(k)
        save()

    pid = fork(work)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def test_a_save_killed_at_each_of_its_steps_leaves_the_old_adapter_or_the_new(pair, expected, tmp_path):
    directory = tmp_path / "adapter"
    steps_seen = 0
    for k in range(1, 50):
        pair["A"].save_pretrained(directory)
        killed = _run_killed_at(k, lambda: pair["B"].save_pretrained(directory))
        if not killed:
            break  # the save has fewer steps than k: every step was tried
        steps_seen = k
        # Committed (the staging folder renamed) from step 4 on: wrote weights, wrote config, staged, committed.
        assert (directory / ".peft-commit").exists() == (4 <= k <= 7)  # a roll-forward the kill interrupted
        assert which(directory, expected) == ("A" if k < 4 else "B"), k
        assert not (directory / ".peft-commit").exists()  # the load finished it, for readers of other libraries
        pair["A"].save_pretrained(directory)  # the next save discards what the kill left
        assert which(directory, expected) == "A" and leftovers(directory) == []
    assert steps_seen == 7  # wrote weights, wrote config, staged, committed, moved config, moved weights, done


def test_a_stack_save_killed_at_each_step_leaves_the_whole_old_stack_or_the_new(llama_dir, tmp_path):
    def build(seed: int) -> PeftModel:
        torch.manual_seed(seed)
        model = get_peft_model(tiny_model("llama", llama_dir), stack([
            LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
            IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                      init_ia3_weights=False),
        ]))
        return model.eval()

    old, new = build(1), build(2)
    expected = {"old": old(IDS).logits, "new": new(IDS).logits}
    assert not torch.allclose(expected["old"], expected["new"], atol=1e-3)
    directory = tmp_path / "stack"
    for k in range(1, 80):
        old.save_pretrained(directory)
        if not _run_killed_at(k, lambda: new.save_pretrained(directory)):
            break
        logits = PeftModel.from_pretrained(tiny_model("llama", llama_dir), directory)(IDS).logits
        matches = [name for name, value in expected.items() if torch.allclose(logits, value, rtol=0, atol=1e-6)]
        assert len(matches) == 1, f"killed at step {k}: the stack loads as a mix"
        # Each member loads alone from its own folder too, as the same save.
        member = read_adapter(directory / "lora")
        assert member.config_sha256 == read_adapter(directory, subfolder="lora").config_sha256
    assert k > 10


def test_two_processes_saving_into_one_folder_end_with_one_whole_adapter(pair, expected, tmp_path):
    directory = tmp_path / "adapter"
    pair["A"].save_pretrained(directory)

    def saves(name: str):
        return lambda: [pair[name].save_pretrained(directory) for _ in range(15)]

    running, statuses, reads = {fork(saves("A")), fork(saves("B"))}, [], 0
    while running:
        which(directory, expected)  # a reader during the saves: always one whole adapter
        reads += 1
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                statuses.append(status)
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses)
    assert which(directory, expected) in ("A", "B") and leftovers(directory) == []
    assert reads > 1


def test_threads_saving_and_reading_one_folder(pair, expected, tmp_path):
    directory = tmp_path / "adapter"
    pair["A"].save_pretrained(directory)
    errors: list[BaseException] = []

    def run(work) -> None:
        try:
            for _ in range(10):
                work()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(lambda name=name: pair[name].save_pretrained(directory),))
               for name in ("A", "B")]
    threads += [threading.Thread(target=run, args=(lambda: which(directory, expected),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert leftovers(directory) == []


def test_a_config_from_another_save_is_refused_and_can_be_loaded_on_purpose(pair, tmp_path, llama_dir):
    """What a kill no longer leaves behind, another program can: it is refused, naming both files."""
    pair["A"].save_pretrained(tmp_path / "a")
    pair["B"].save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_bytes((tmp_path / "a" / "adapter_config.json").read_bytes())
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json is not the config adapter_model\.safetensors "
                                               r"was saved with .*verify_integrity=False"):
        PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "b")
    loaded = PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "b", verify_integrity=False)
    assert loaded.peft_config["default"].lora_alpha == 8  # A's config, as asked

    pair["B"].save_pretrained(tmp_path / "b")
    weights = tmp_path / "b" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of one factor: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterLoadError, match="does not hold the tensors it was saved with"):
        PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "b", verify_integrity=True)


def test_a_stack_mixing_members_of_two_saves_is_refused(llama_dir, tmp_path):
    def build(seed: int) -> PeftModel:
        torch.manual_seed(seed)
        return get_peft_model(tiny_model("llama", llama_dir), stack([
            LoraConfig(r=2, lora_alpha=seed, target_modules=["q_proj"], init_lora_weights=False),
            LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False),
        ]))

    build(1).save_pretrained(tmp_path / "one")
    build(2).save_pretrained(tmp_path / "two")
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # member "lora" of save two into save one
        (tmp_path / "one" / "lora" / name).write_bytes((tmp_path / "two" / "lora" / name).read_bytes())
    with pytest.raises(AdapterLoadError, match="member 'lora' is not the adapter peft_stack.json was saved with"):
        PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "one")
    PeftModel.from_pretrained(tiny_model("llama", llama_dir), tmp_path / "one", verify_integrity=False)


def test_saving_one_adapter_over_a_stack_drops_the_stale_manifest(llama_dir, tmp_path):
    model = get_peft_model(tiny_model("llama", llama_dir), stack([
        LoraConfig(r=2, target_modules=["q_proj"]), LoraConfig(r=2, target_modules=["v_proj"]),
    ]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "peft_stack.json").is_file()
    model.set_adapter("lora")
    model.save_pretrained(tmp_path, selected_adapters=["lora"])  # the stack it named is no longer what is saved
    assert not (tmp_path / "peft_stack.json").exists()


def test_saved_files_get_the_mode_of_normal_files(pair, tmp_path):
    old = os.umask(0o022)
    try:
        pair["A"].save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == 0o644
