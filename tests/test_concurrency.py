"""Serving from threads.

Calls with their own ``adapter_names`` run concurrently and give exactly what they give one at a time;
``ServingModel`` orders adapter changes with the calls in flight, so no call sees half a change.
"""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time
from collections.abc import Callable

import pytest
import torch
from peft_core import PeftError, PeftModel, ServingModel, get_peft_model
from peft_core.testing import tiny_model
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from peft_prefix_tuning import PrefixTuningConfig
from peft_prompt_tuning import PromptTuningConfig

CHOICES = ["lora-4", "lora-8", "ia3", "prompt", "prefix", "__base__"]
ACTIVE = ["lora-8", "prompt"]  # what a request without adapter_names gets: a stack, soft prompt included
GENERATION = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
WAIT = 30  # seconds: a bound for waits that end at once unless something is broken


def adapter_configs() -> dict:
    return {
        "lora-4": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "lora-8": LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
        "ia3": IA3Config(init_ia3_weights=False),
        "prompt": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"),
    }


def many_adapters(llama_dir) -> PeftModel:
    """The same model every time: a tiny Llama with LoRAs of two ranks, IA3 and two soft prompts."""
    torch.manual_seed(0)
    configs = adapter_configs()
    first = next(iter(configs))
    model = get_peft_model(tiny_model("llama", llama_dir), configs.pop(first), first)
    for name, config in configs.items():
        model.add_adapter(name, config)
    model.set_adapter(ACTIVE)
    return model.eval()


def make_requests(seed: int, count: int) -> list[tuple[torch.Tensor, list[str] | None]]:
    """Batches of 1 to 4 samples, 3 to 8 tokens, random adapters per sample (sometimes the active ones)."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(count):
        size, length = rng.randint(1, 4), rng.randint(3, 8)
        input_ids = torch.randint(2, 128, (size, length), generator=generator)
        names = None if rng.random() < 0.15 else [rng.choice(CHOICES) for _ in range(size)]
        requests.append((input_ids, names))
    return requests


def logits(model, request) -> torch.Tensor:
    input_ids, names = request
    with torch.no_grad():
        return model(input_ids=input_ids, adapter_names=names).logits


def generated(model, request) -> torch.Tensor:
    input_ids, names = request
    return model.generate(input_ids=input_ids, adapter_names=names, **GENERATION)


def in_threads(work: Callable, per_thread: list[list]) -> list[list]:
    """Each thread runs ``work`` on its items; all start together, to overlap as much as they can."""
    start = threading.Barrier(len(per_thread), timeout=WAIT)

    def worker(items):
        start.wait()
        return [work(item) for item in items]

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(per_thread)) as pool:
        futures = [pool.submit(worker, items) for items in per_thread]
        return [future.result() for future in futures]


# --- concurrent calls ------------------------------------------------------------------------------


def test_the_adapters_served_give_different_outputs(llama_dir):
    """Otherwise a thread computing with another thread's adapter would go unnoticed below."""
    model = many_adapters(llama_dir)
    input_ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    outputs = [logits(model, (input_ids, [name]))[:, -6:] for name in CHOICES]
    outputs.append(logits(model, (input_ids, None))[:, -6:])
    for i, first in enumerate(outputs):
        for second in outputs[i + 1 :]:
            assert (first - second).abs().max() > 1e-3


def assert_threads_match_one_at_a_time(call, per_thread: list[list]) -> None:
    """``call`` on each thread's requests, run from threads at once, gives exactly what it gives run alone."""
    one_at_a_time = [[call(r) for r in requests] for requests in per_thread]
    together = in_threads(call, per_thread)
    for expected_thread, actual_thread in zip(one_at_a_time, together, strict=True):
        for expected, actual in zip(expected_thread, actual_thread, strict=True):
            assert torch.equal(actual, expected)


def test_eight_threads_of_mixed_batches_give_what_one_at_a_time_gives(llama_dir):
    model = many_adapters(llama_dir)
    per_thread = [make_requests(seed=100 + t, count=50) for t in range(8)]
    assert_threads_match_one_at_a_time(lambda r: logits(model, r), per_thread)


def test_generation_from_threads_gives_what_one_at_a_time_gives(llama_dir):
    model = many_adapters(llama_dir)
    per_thread = [make_requests(seed=200 + t, count=3) for t in range(8)]
    assert_threads_match_one_at_a_time(lambda r: generated(model, r), per_thread)


def test_first_generate_calls_from_threads_install_one_hook(llama_dir, monkeypatch):
    """Soft prompts join generation through a forward pre-hook installed by the first generate; threads
    that start at once must not each install one (each would add the prompt again)."""
    request = (torch.randint(2, 128, (2, 5), generator=torch.Generator().manual_seed(7)), ["prompt", "prefix"])
    expected = generated(many_adapters(llama_dir), request)
    model = many_adapters(llama_dir)
    inner = model.base_model.model
    hooks_before = len(inner._forward_pre_hooks)
    register = inner.register_forward_pre_hook

    def slow_register(*args, **kwargs):  # widens the window between checking for the hook and installing it
        time.sleep(0.05)
        return register(*args, **kwargs)

    monkeypatch.setattr(inner, "register_forward_pre_hook", slow_register)
    results = in_threads(lambda r: generated(model, r), [[request]] * 4)
    assert len(inner._forward_pre_hooks) == hooks_before + 1
    for [actual] in results:
        assert torch.equal(actual, expected)


# --- changing adapters while serving ---------------------------------------------------------------


@pytest.fixture
def swappable(llama_dir, tmp_path) -> tuple[PeftModel, dict]:
    """A model serving LoRA ``a``, IA3 ``ia3`` and LoRA ``x``, and two saved versions of ``x`` to swap in."""
    x = dict(r=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    versions = {}
    for version in (0, 1):
        torch.manual_seed(10 + version)
        get_peft_model(tiny_model("llama", llama_dir), LoraConfig(**x)).save_pretrained(tmp_path / f"x{version}")
        versions[version] = tmp_path / f"x{version}"
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", llama_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       init_lora_weights=False), "a")
    model.add_adapter("ia3", IA3Config(init_ia3_weights=False))
    model.load_adapter(versions[0], "x")
    model.set_adapter("a")
    return model.eval(), versions


def swap_x(model: PeftModel, path) -> None:
    model.delete_adapter("x")
    model.load_adapter(path, "x")


REQUEST = (torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(3)), ["x", "a"])


def with_each_x(model: PeftModel, versions: dict) -> dict[int, torch.Tensor]:
    """The request's output with each version of ``x``; the model is left with version 0."""
    outputs = {}
    for version in (1, 0):
        swap_x(model, versions[version])
        outputs[version] = logits(model, REQUEST)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3
    return outputs


class Background:
    """A call run in a daemon thread, so that a broken lock fails a test instead of hanging it."""

    def __init__(self, call: Callable[[], object], name: str | None = None) -> None:
        self.done = threading.Event()
        self._outcome: tuple[bool, object] = (False, None)
        threading.Thread(target=self._run, args=(call,), name=name, daemon=True).start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self._outcome = (True, call())
        except BaseException as exc:  # handed to the test thread by result()
            self._outcome = (False, exc)
        finally:
            self.done.set()

    def result(self) -> object:
        assert self.done.wait(WAIT), "the call is still running"
        returned, value = self._outcome
        if not returned:
            raise value
        return value


class PauseInside:
    """Stops calls made in threads named ``paused`` at the model's second decoder layer until released: a
    call deterministically in flight, half computed."""

    def __init__(self, model: PeftModel) -> None:
        self.reached, self.release = threading.Event(), threading.Event()
        model.base_model.model.model.layers[1].register_forward_pre_hook(self._hold)

    def _hold(self, module, args):
        if threading.current_thread().name == "paused":
            self.reached.set()
            assert self.release.wait(WAIT)

    def start(self, call: Callable[[], torch.Tensor]) -> Background:
        """Run ``call`` in a paused thread; return once it is held."""
        background = Background(call, name="paused")
        assert self.reached.wait(WAIT)
        return background


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_unguarded_change_during_a_call_gives_a_mix_of_two_adapters(swappable):
    """Why ServingModel exists: a call in flight computes its first layers with the old ``x`` and the rest
    with the new one, and returns what neither adapter computes."""
    model, versions = swappable
    expected = with_each_x(model, versions)
    pause = PauseInside(model)
    call = pause.start(lambda: logits(model, REQUEST))
    swap_x(model, versions[1])  # nothing stops it
    pause.release.set()
    for version in (0, 1):
        assert (call.result() - expected[version]).abs().max() > 1e-3


def test_a_change_waits_for_calls_in_flight_which_see_the_adapters_they_started_with(swappable):
    model, versions = swappable
    expected = with_each_x(model, versions)
    served, pause = ServingModel(model), PauseInside(model)
    call = pause.start(lambda: served(input_ids=REQUEST[0], adapter_names=REQUEST[1]).logits)
    change = Background(lambda: served.load_adapter(versions[1], "x-new"))
    wait_until(lambda: served.lock.changes_waiting == 1)
    assert not change.done.wait(0.2)  # the change waits while the call is in flight
    pause.release.set()
    assert torch.equal(call.result(), expected[0])
    change.result()
    assert "x-new" in model.peft_config
    with served.changing() as held:
        swap_x(held, versions[1])
    assert torch.equal(served(input_ids=REQUEST[0], adapter_names=REQUEST[1]).logits, expected[1])


def test_a_waiting_change_holds_back_new_calls(swappable):
    """Writer preference: a call that comes after a change began waiting runs after the change."""
    model, versions = swappable
    expected = with_each_x(model, versions)
    served, pause = ServingModel(model), PauseInside(model)

    def call():
        return served(input_ids=REQUEST[0], adapter_names=REQUEST[1]).logits

    def change():
        with served.changing() as held:
            swap_x(held, versions[1])

    first = pause.start(call)
    changed = Background(change)
    wait_until(lambda: served.lock.changes_waiting == 1)
    second = Background(call)
    assert not second.done.wait(0.2)  # behind the waiting change, though only a call holds the lock
    pause.release.set()
    assert torch.equal(first.result(), expected[0])
    changed.result()
    assert torch.equal(second.result(), expected[1])


def test_calls_nest_in_a_serving_block_and_in_a_change_but_a_change_never_nests_in_serving(swappable):
    model, versions = swappable
    served = ServingModel(model)

    def serving_block():
        with served.serving() as held:
            before = logits(held, REQUEST)
            change = Background(lambda: served.set_adapter("ia3"))
            wait_until(lambda: served.lock.changes_waiting == 1)
            # A nested call must not queue behind the waiting change, which waits for this very block.
            nested = served(input_ids=REQUEST[0], adapter_names=REQUEST[1]).logits
            with pytest.raises(PeftError, match="leave the serving block"), served.changing():
                pass
            assert not change.done.is_set()
        change.result()
        return before, nested

    before, nested = Background(serving_block).result()
    assert torch.equal(nested, before)
    assert model.active_adapters == ["ia3"]

    def changing_block():
        with served.changing() as held:
            served.set_adapter("a")  # the exclusive side nests too
            swap_x(held, versions[1])
            return served(input_ids=REQUEST[0], adapter_names=REQUEST[1]).logits

    assert torch.equal(Background(changing_block).result(), logits(model, REQUEST))
    assert served.lock.in_flight == 0 and served.lock.changes_waiting == 0


def test_serving_threads_see_whole_changes_only(swappable):
    """Six threads serve through ServingModel while another one keeps swapping ``x`` for its other
    version and switching the active adapter: every output is one a consistent model gives."""
    model, versions = swappable
    choices, active_choices = ["a", "ia3", "x", "__base__"], ["a", "ia3", "x"]
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    requests = []
    for _ in range(60):
        size = rng.randint(1, 3)
        names = None if rng.random() < 0.3 else [rng.choice(choices) for _ in range(size)]
        requests.append((torch.randint(2, 128, (size, rng.randint(3, 6)), generator=generator), names))
    valid: list[list[torch.Tensor]] = [[] for _ in requests]
    for version in (1, 0):
        swap_x(model, versions[version])
        for active in active_choices:
            model.set_adapter(active)
            for i, request in enumerate(requests):
                if request[1] is None or active == "a":
                    valid[i].append(logits(model, request))
    served = ServingModel(model)
    changes_done = threading.Event()

    def change():
        change_rng = random.Random(1)
        for step in range(20):
            with served.changing() as held:
                swap_x(held, versions[step % 2])
                held.set_adapter(change_rng.choice(active_choices))
            time.sleep(0.005)
        changes_done.set()

    def serve(indices):
        seen, passes, deadline = [], 0, time.monotonic() + WAIT
        # Serve for as long as changes happen; a lock that lets calls starve changes ends at the deadline.
        while passes == 0 or not (changes_done.is_set() or time.monotonic() > deadline):
            for i in indices:
                input_ids, names = requests[i]
                seen.append((i, served(input_ids=input_ids, adapter_names=names).logits))
            passes += 1
        return seen, changes_done.is_set()

    changer = Background(change)
    served_per_thread = in_threads(serve, [[list(range(t, len(requests), 6))] for t in range(6)])
    changer.result()
    for [(seen, changes_were_done)] in served_per_thread:
        assert changes_were_done  # the changes were not starved by the stream of calls
        for i, output in seen:
            assert any(torch.equal(output, candidate) for candidate in valid[i]), requests[i][1]
