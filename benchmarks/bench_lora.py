"""LoRA speed of peft-core + peft-lora against Hugging Face PEFT, in one process, on the CPU.

Builds one tiny Llama (random weights, nothing downloaded), gives the same base weights and the same
non-zero LoRA weights (r=16, lora_alpha=32, dropout 0, all seven projections) to our library and to
Hugging Face PEFT, checks that both compute the same thing, then times them with interleaved
repetitions and prints the medians and the ratio ours / HF PEFT for each figure:

    python benchmarks/bench_lora.py                # full run, a few minutes on 2 cores
    python benchmarks/bench_lora.py --quick        # a smoke run with few repetitions
    python benchmarks/bench_lora.py --json out.json --strict

See benchmarks/README.md for what each figure measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
BATCH, SEQ = 4, 128
# Outputs of the two libraries must agree this closely (float32 logits of a few units in size).
TOLERANCE = 1e-4

# Each import probe runs in a fresh interpreter and prints the wall and CPU seconds its imports took.
_PROBE = (
    "import time; w, c = time.perf_counter(), time.process_time(); {}; "
    "print(time.perf_counter() - w, time.process_time() - c)"
)
IMPORT_PROBES = {
    "ours": _PROBE.format("import peft_core; peft_core.methods()"),
    "theirs": _PROBE.format("import peft"),
}
CLOCKS = ("wall", "cpu")
Sample = tuple[float, float]  # one timing: (wall seconds, CPU seconds of this process)


FIGURES = ("train", "infer", "merged", "inject", "import")


@dataclass
class Repeats:
    train: int
    infer: int
    merged: int
    inject: int
    imports: int
    warmup: int


FULL = Repeats(train=25, infer=30, merged=30, inject=20, imports=8, warmup=3)
QUICK = Repeats(train=3, infer=4, merged=3, inject=3, imports=2, warmup=1)


@dataclass
class Figure:
    name: str
    ours_samples: list[Sample]
    theirs_samples: list[Sample]
    target: float
    theirs_label: str = "HF PEFT"
    notes: str = ""
    clock: str = "cpu"  # which of the two clocks the figure is judged on
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ours(self) -> list[float]:
        return [sample[CLOCKS.index(self.clock)] for sample in self.ours_samples]

    @property
    def theirs(self) -> list[float]:
        return [sample[CLOCKS.index(self.clock)] for sample in self.theirs_samples]

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours)

    @property
    def theirs_median(self) -> float:
        return statistics.median(self.theirs)

    @property
    def ratio(self) -> float:
        """The judged figure: the median over rounds of ours / other timed in the same round.

        Both sides of a round run back to back, so a change in machine load between rounds (other
        jobs starting or stopping: samples here are often bimodal) cancels out of each round's ratio.
        """
        return statistics.median(a / b for a, b in zip(self.ours, self.theirs, strict=True))

    @property
    def median_ratio(self) -> float:
        """median(ours) / median(other): equal to ``ratio`` on a quiet machine."""
        return self.ours_median / self.theirs_median

    @property
    def noisy(self) -> bool:
        """Near the target, and the two ratios disagree by more than 5%: the verdict is not reliable."""
        near = abs(self.ratio / self.target - 1) < 0.10
        return near and abs(self.median_ratio / self.ratio - 1) > 0.05

    @property
    def passed(self) -> bool:
        return self.ratio <= self.target

    def as_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name, "versus": self.theirs_label, "target": self.target, "pass": self.passed,
            "clock": self.clock, "ours_ms": 1e3 * self.ours_median, "theirs_ms": 1e3 * self.theirs_median,
            "ratio": self.ratio, "median_ratio": self.median_ratio, "noisy": self.noisy, "notes": self.notes,
        }
        for clock in CLOCKS:  # every sample on both clocks
            i = CLOCKS.index(clock)
            data[f"ours_{clock}_ms"] = [1e3 * sample[i] for sample in self.ours_samples]
            data[f"theirs_{clock}_ms"] = [1e3 * sample[i] for sample in self.theirs_samples]
        return {**data, **self.extra}


# --- timing -------------------------------------------------------------------------------------


def interleaved(runs: dict[str, Callable[[], Sample]], repeats: int, warmup: int) -> dict[str, list[Sample]]:
    """Time each callable ``repeats`` times, round-robin (A B, B A, A B, ...), after ``warmup`` rounds.

    A callable returns the time its measured part took, so set-up work (building a fresh model) can
    stay outside the timed region. Alternating the order inside each round cancels any advantage of
    going first (warmer caches) or second; the garbage collector runs before each call, not during.
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[Sample]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            gc.collect()
            times[name].append(runs[name]())
    return times


def stopwatch() -> Callable[[], Sample]:
    """Start both clocks; calling the result reads the (wall, CPU) seconds since."""
    wall, cpu = time.perf_counter(), time.process_time()
    return lambda: (time.perf_counter() - wall, time.process_time() - cpu)


def timed(fn: Callable[[], Any]) -> Callable[[], Sample]:
    def run() -> Sample:
        stop = stopwatch()
        fn()
        return stop()

    return run


# --- models -------------------------------------------------------------------------------------


def tiny_llama_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=2 * SEQ, use_cache=False,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )


def llama_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, use_cache=False,
    )


LORA_KWARGS = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def ours_config():
    from peft_lora import LoraConfig

    return LoraConfig(**LORA_KWARGS)


def theirs_config():
    from peft import LoraConfig

    return LoraConfig(**LORA_KWARGS)


def lora_key(name: str) -> str:
    """A LoRA parameter's name without the adapter name, the same for both libraries.

    Ours: ``...q_proj.adapters.default.lora_A.weight``; HF PEFT: ``...q_proj.lora_A.default.weight``.
    """
    return name.replace(".adapters.default.", ".").replace(".default.", ".")


def lora_params(model) -> dict[str, Any]:
    return {lora_key(n): p for n, p in model.named_parameters() if "lora_" in n}


def base_factory(config, seed: int):
    """A function that builds fresh copies of one randomly initialised base model."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    state = LlamaForCausalLM(config).state_dict()

    def fresh():
        model = LlamaForCausalLM(config)
        model.load_state_dict(state)
        return model

    return fresh


def build_models(vocab: int, seed: int):
    """The base model and the two LoRA models, on identical base and adapter weights."""
    from peft import get_peft_model as hf_get_peft_model
    from peft_core import get_peft_model

    config = tiny_llama_config(vocab)
    fresh = base_factory(config, seed)
    base = fresh()
    ours = get_peft_model(fresh(), ours_config())
    theirs = hf_get_peft_model(fresh(), theirs_config())

    share_lora_weights(ours, theirs, config.num_hidden_layers, seed)
    return config, base, ours, theirs


def share_lora_weights(ours, theirs, layers: int, seed: int) -> None:
    """Give both models the same non-zero LoRA weights.

    B starts at zero in both libraries: give HF PEFT's B random values, so the adapters change the
    output, and copy HF PEFT's A and B into ours, so both hold the same weights.
    """
    import torch

    ours_p, theirs_p = lora_params(ours), lora_params(theirs)
    if sorted(ours_p) != sorted(theirs_p) or len(ours_p) != 2 * len(TARGETS) * layers:
        raise SystemExit(f"LoRA parameters differ between the libraries: {len(ours_p)} vs {len(theirs_p)}.")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, param in theirs_p.items():
            if ".lora_B." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            ours_p[key].copy_(param)


def inputs(vocab: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    return ids, ids.clone()


# --- checks -------------------------------------------------------------------------------------


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def verify(base, ours, theirs, ids, labels, train_mode: bool = False) -> dict[str, float]:
    """Outputs, loss and gradients agree between the libraries, and the adapters change the output.

    ``train_mode`` compares the outputs in train mode and leaves the models there (bench_qlora.py says why).
    """
    import torch

    for model in (base, ours, theirs):
        model.train(train_mode)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        ours_logits = ours(input_ids=ids).logits
        theirs_logits = theirs(input_ids=ids).logits
    checks = {
        "unmerged_logits_max_abs_diff": max_diff(ours_logits, theirs_logits),
        "lora_effect_max_abs": max_diff(ours_logits, base_logits),
    }

    for model in (ours, theirs):
        model.train()
        model.zero_grad(set_to_none=True)
    ours_loss = ours(input_ids=ids, labels=labels).loss
    theirs_loss = theirs(input_ids=ids, labels=labels).loss
    ours_loss.backward()
    theirs_loss.backward()
    checks["train_loss_abs_diff"] = abs(ours_loss.item() - theirs_loss.item())
    ours_p, theirs_p = lora_params(ours), lora_params(theirs)
    checks["lora_grad_max_abs_diff"] = max(max_diff(ours_p[k].grad, theirs_p[k].grad) for k in ours_p)
    missing = [k for k, p in ours_p.items() if p.grad is None or not p.grad.abs().sum() > 0]
    trainable_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    trainable_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        model.train(train_mode)

    bad = [k for k, v in checks.items() if k != "lora_effect_max_abs" and not v <= TOLERANCE]
    if checks["lora_effect_max_abs"] < 100 * TOLERANCE:
        bad.append("lora_effect_max_abs (the adapters barely change the output)")
    if trainable_ours != trainable_theirs:
        bad.append(f"trainable parameters: {trainable_ours} vs {trainable_theirs}")
    if missing:  # with checkpointing, a block whose input needs no grad would leave its adapters untrained
        bad.append(f"{len(missing)} LoRA parameters got no gradient, e.g. {missing[0]}")
    if bad:
        raise SystemExit(f"Verification failed, timing would compare different work: {bad}; {checks}")
    return checks


def verify_merged(ours, theirs, ids, unmerged_logits) -> dict[str, float]:
    import torch

    with torch.inference_mode():
        ours_logits = ours(input_ids=ids).logits
        theirs_logits = theirs(input_ids=ids).logits
    checks = {
        "merged_logits_max_abs_diff": max_diff(ours_logits, theirs_logits),
        "merged_vs_unmerged_max_abs_diff": max_diff(ours_logits, unmerged_logits),
    }
    # Merging rounds differently from the two-matmul path, so allow a little more than TOLERANCE.
    if not all(v <= 10 * TOLERANCE for v in checks.values()):
        raise SystemExit(f"Merged verification failed: {checks}")
    return checks


# --- figures ------------------------------------------------------------------------------------


def bench_training(ours, theirs, ids, labels, reps: Repeats) -> Figure:
    import torch

    def step_fn(model):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()

        return timed(step)

    times = interleaved({"ours": step_fn(ours), "theirs": step_fn(theirs)}, reps.train, reps.warmup)
    for model in (ours, theirs):
        model.eval()
    return Figure("train step (fwd+bwd+AdamW)", times["ours"], times["theirs"], 1.0)


def forward_fn(model, ids) -> Callable[[], Sample]:
    import torch

    def forward():
        with torch.inference_mode():
            model(input_ids=ids)

    return timed(forward)


def bench_inference(base, ours, theirs, ids, reps: Repeats) -> tuple[Figure, Figure]:
    times = interleaved(
        # Ours in the middle: each round times it right next to HF PEFT and right next to the base.
        {"theirs": forward_fn(theirs, ids), "ours": forward_fn(ours, ids), "base": forward_fn(base, ids)},
        reps.infer, reps.warmup,
    )
    return (
        Figure("unmerged inference", times["ours"], times["theirs"], 1.0),
        Figure("unmerged inference vs base", times["ours"], times["base"], 1.10, theirs_label="base model",
               notes="the same LoRA model against the plain transformers model (no adapters)"),
    )


def bench_merged(ours, theirs, ids, reps: Repeats) -> Figure:
    runs = {"ours": forward_fn(ours, ids), "theirs": forward_fn(theirs, ids)}
    times = interleaved(runs, reps.merged, reps.warmup)
    return Figure("merged inference (merge_adapter)", times["ours"], times["theirs"], 1.0)


def bench_injection(reps: Repeats) -> Figure:
    import torch
    from peft import get_peft_model as hf_get_peft_model
    from peft_core import get_peft_model
    from transformers import LlamaForCausalLM

    config = llama_7b_config()

    def inject_fn(get, make_config):
        def run() -> Sample:
            with torch.device("meta"):
                model = LlamaForCausalLM(config)
            lora_config = make_config()
            gc.collect()
            stop = stopwatch()
            get(model, lora_config)
            return stop()

        return run

    runs = {
        "ours": inject_fn(get_peft_model, ours_config), "theirs": inject_fn(hf_get_peft_model, theirs_config),
    }
    times = interleaved(runs, reps.inject, max(1, reps.warmup // 2))
    return Figure("inject, Llama-2-7B on meta", times["ours"], times["theirs"], 1.0,
                  notes="get_peft_model only; a fresh meta model per repetition, built outside the timing")


def bench_imports(reps: Repeats) -> Figure:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # Every probe reads the same files: no probe writes bytecode caches (not into the source tree
    # either). Installed packages ship theirs; our editable sources compile in a few milliseconds.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"

    with tempfile.TemporaryDirectory() as cwd:  # nothing in the working directory shadows a package

        def probe(code: str) -> Callable[[], Sample]:
            def run() -> Sample:
                command = [sys.executable, "-c", code]
                done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"Import probe failed:\n{code}\n{done.stderr}")
                wall, cpu = done.stdout.strip().splitlines()[-1].split()
                return float(wall), float(cpu)

            return run

        times = interleaved({side: probe(code) for side, code in IMPORT_PROBES.items()}, reps.imports, 1)
    return Figure("import + plugin discovery", times["ours"], times["theirs"], 1.0,
                  notes="`import peft_core; peft_core.methods()` vs `import peft`, fresh interpreter each")


# --- report -------------------------------------------------------------------------------------


def print_table(figures: list[Figure]) -> None:
    header = (
        f"{'figure':<34} {'ours ms':>9} {'other ms':>9} {'other':<10} {'ratio':>6} {'med/med':>7} "
        f"{'target':>7}  result"
    )
    print(header)
    print("-" * len(header))
    for f in figures:
        print(
            f"{f.name:<34} {1e3 * f.ours_median:>9.2f} {1e3 * f.theirs_median:>9.2f} {f.theirs_label:<10} "
            f"{f.ratio:>6.3f} {f.median_ratio:>7.3f} {'<= ' + format(f.target, '.2f'):>7}  "
            f"{'PASS' if f.passed else 'FAIL'}{' (noisy)' if f.noisy else ''}"
            f"{' (within 2%: a tie, rerun)' if not f.passed and f.ratio <= 1.02 * f.target else ''}"
        )
    print(
        f"times: medians, {figures[0].clock if figures else ''} clock. ratio: median over rounds of "
        "ours/other timed back to back (judged against the target); med/med: median(ours)/median(other)."
    )


def setup_torch(threads: int) -> None:
    """Silence warnings and transformers' logging, and fix torch's intra-op threads for the run."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)


def report(figures: list[Figure], json_path: str | None, threads: int = 1) -> int:
    """Print the table, write the JSON if asked; exit status 0 if every figure met its target."""
    print_table(figures)
    if json_path:
        write_json(json_path, {"environment": environment(threads), "figures": [f.as_dict() for f in figures]})
    return 0 if all(f.passed for f in figures) else 1


def write_json(path: str, result: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)
        out.write("\n")
    print(f"wrote {path}")


def environment(threads: int) -> dict[str, Any]:
    import peft
    import peft_core
    import torch
    import transformers

    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "peft_core": peft_core.__version__, "threads": threads, "loadavg_start": load_average(),
    }


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: above the CPU count, other work shared the cores."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="few repetitions: a smoke test, not a measurement"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results (all samples) to this file")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default: 1; see README: >1 on a busy machine measures the scheduler)",
    )
    parser.add_argument(
        "--vocab", type=int, default=8192, help="vocabulary of the tiny Llama (default: 8192)"
    )
    parser.add_argument(
        "--clock", choices=CLOCKS,
        help="judge on wall time or on this process's CPU time (default: cpu with 1 thread, else wall)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", nargs="+", metavar="FIGURE", choices=list(FIGURES),
        help=f"run only these figures: {' '.join(FIGURES)}",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 if any figure misses its target"
    )
    args = parser.parse_args(argv)
    reps = QUICK if args.quick else FULL
    wanted = set(args.only or FIGURES)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")

    setup_torch(args.threads)
    import torch
    env = environment(args.threads)
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, peft_core "
        f"{env['peft_core']}; {args.threads} threads of {env['cpus']} CPUs; "
        f"{'quick' if args.quick else 'full'} run; {clock} clock; load average {env['loadavg_start']}"
    )
    started = time.perf_counter()

    figures: list[Figure] = []
    checks: dict[str, float] = {}
    if wanted & {"train", "infer", "merged"}:
        config, base, ours, theirs = build_models(args.vocab, args.seed)
        ids, labels = inputs(args.vocab, args.seed)
        print(
            f"tiny Llama: hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
            f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
            f"vocab {config.vocab_size}; "
            f"batch {BATCH} x seq {SEQ}, float32; LoRA r={RANK} alpha={ALPHA} on {len(TARGETS)} projections"
        )
        checks.update(verify(base, ours, theirs, ids, labels))
        print("verified: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))

        if "infer" in wanted:
            figures.extend(bench_inference(base, ours, theirs, ids, reps))
        if "merged" in wanted:
            with torch.inference_mode():
                unmerged_logits = ours(input_ids=ids).logits
            ours.merge_adapter()
            theirs.merge_adapter()
            merged_checks = verify_merged(ours, theirs, ids, unmerged_logits)
            print("verified merged: " + ", ".join(f"{k} {v:.2e}" for k, v in merged_checks.items()))
            checks.update(merged_checks)
            figures.append(bench_merged(ours, theirs, ids, reps))
            ours.unmerge_adapter()
            theirs.unmerge_adapter()
        if "train" in wanted:
            figures.insert(0, bench_training(ours, theirs, ids, labels, reps))
        del base, ours, theirs
    if "inject" in wanted:
        figures.append(bench_injection(reps))
    if "import" in wanted:
        figures.append(bench_imports(reps))

    for figure in figures:
        figure.clock = clock
    print()
    print_table(figures)
    elapsed = time.perf_counter() - started
    failed = [f.name for f in figures if not f.passed]
    env["loadavg_end"] = load_average()
    print(
        f"\n{len(figures) - len(failed)}/{len(figures)} figures meet their target; {elapsed:.0f} s in all; "
        f"load average now {env['loadavg_end']}."
    )
    if args.json:
        result = {
            "mode": "quick" if args.quick else "full", "clock": clock, "environment": env,
            "repeats": vars(reps), "verification": checks, "seconds": elapsed,
            "figures": [f.as_dict() for f in figures],
        }
        write_json(args.json, result)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
