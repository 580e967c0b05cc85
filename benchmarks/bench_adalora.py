"""AdaLoRA (peft-adalora) training-step speed against Hugging Face PEFT, in one process, on the CPU.

The tiny Llama of bench_lora.py (random weights, nothing downloaded) gets an AdaLoRA adapter
(init_r=12, target_r=8, lora_alpha=32, all seven projections, task CAUSAL_LM so both libraries add the
orthogonal penalty) in Hugging Face PEFT; its adapter, with random non-zero weights, is saved and loaded
into ours, so both hold identical weights. The script checks that logits and the training loss agree,
then times one training step on each side: forward + backward + AdamW + ``update_and_allocate``, with
``deltaT=1`` and ``tinit=0`` so the allocator scores and masks at every step (its most expensive path).
Rounds are interleaved as in bench_lora.py; it prints the medians and the ratio ours / HF PEFT.

    python benchmarks/bench_adalora.py            # about a minute on 2 cores
    python benchmarks/bench_adalora.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The benchmarks folder is not a package: import bench_lora's helpers from next to this file.
from bench_lora import (
    TARGETS,
    TOLERANCE,
    Figure,
    base_factory,
    environment,
    inputs,
    interleaved,
    max_diff,
    print_table,
    setup_torch,
    timed,
    tiny_llama_config,
)

ADALORA_KWARGS = dict(
    init_r=12, target_r=8, lora_alpha=32, lora_dropout=0.0, tinit=0, tfinal=0, deltaT=1, total_step=10_000,
    target_modules=TARGETS, task_type="CAUSAL_LM",
)


def build_models(vocab: int, seed: int, workdir: str):
    import peft
    import torch
    from peft_core import PeftModel

    fresh = base_factory(tiny_llama_config(vocab), seed)

    theirs = peft.get_peft_model(fresh(), peft.AdaLoraConfig(**ADALORA_KWARGS))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # E starts at zero in both libraries: give every factor random values
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    theirs.save_pretrained(workdir)
    ours = PeftModel.from_pretrained(fresh(), workdir, is_trainable=True)
    return fresh(), ours, theirs


def verify(base, ours, theirs, ids, labels) -> dict[str, float]:
    import torch

    for model in (base, ours, theirs):
        model.eval()
    with torch.no_grad():
        checks = {
            "logits_max_abs_diff": max_diff(ours(input_ids=ids).logits, theirs(input_ids=ids).logits),
            "adapter_effect_max_abs": max_diff(ours(input_ids=ids).logits, base(input_ids=ids).logits),
        }
    ours.train()
    theirs.train()
    checks["train_loss_abs_diff"] = abs(
        ours(input_ids=ids, labels=labels).loss.item() - theirs(input_ids=ids, labels=labels).loss.item()
    )
    bad = [k for k, v in checks.items() if k != "adapter_effect_max_abs" and not v <= TOLERANCE]
    if checks["adapter_effect_max_abs"] < 100 * TOLERANCE:
        bad.append("adapter_effect_max_abs (the adapters barely change the output)")
    if bad:
        raise SystemExit(f"Verification failed, timing would compare different work: {bad}; {checks}")
    return checks


def bench_training(ours, theirs, ids, labels, repeats: int, warmup: int) -> Figure:
    import torch
    from peft_adalora import install_allocator

    def step_fn(model, allocate):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        allocate = allocate(model, optimizer)

        def step():
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            if allocate is not None:
                allocate()

        return timed(step)

    def ours_allocator(model, optimizer):
        install_allocator(model, optimizer)  # runs inside optimizer.step()
        return None

    def theirs_allocator(model, optimizer):
        counter = iter(range(10**9))
        return lambda: model.base_model.update_and_allocate(next(counter))

    times = interleaved(
        {"ours": step_fn(ours, ours_allocator), "theirs": step_fn(theirs, theirs_allocator)}, repeats, warmup
    )
    return Figure("AdaLoRA train step (+allocate)", times["ours"], times["theirs"], 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", choices=["cpu", "wall"], help="judge on this clock (default: cpu with 1 thread)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if the ratio misses its target")
    args = parser.parse_args(argv)

    setup_torch(args.threads)
    env = environment(args.threads)
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, peft_core "
        f"{env['peft_core']}; {args.threads} threads of {env['cpus']} CPUs; load average {env['loadavg_start']}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_adalora_") as workdir:
        base, ours, theirs = build_models(args.vocab, args.seed, workdir)
    ids, labels = inputs(args.vocab, args.seed)
    checks = verify(base, ours, theirs, ids, labels)
    print("verified: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    del base
    repeats, warmup = (3, 1) if args.quick else (20, 3)
    figure = bench_training(ours, theirs, ids, labels, repeats, warmup)
    figure.clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    print()
    print_table([figure])
    print(f"\nratio ours / HF PEFT: {figure.ratio:.3f} (target <= {figure.target:.2f})")
    return 1 if args.strict and not figure.passed else 0


if __name__ == "__main__":
    sys.exit(main())
