"""IA3 training step time against Hugging Face PEFT, in one process, on the tiny Llama of bench_lora.py.

Same method as bench_lora.py (interleaved rounds, one thread, CPU clock, median of per-round ratios):
both libraries get IA3 on k_proj, v_proj and down_proj (feed-forward), identical random scaling vectors,
and the script checks that logits and gradients agree before timing.

    .venv/bin/python benchmarks/bench_ia3.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import (
    FULL,
    QUICK,
    base_factory,
    bench_training,
    environment,
    inputs,
    max_diff,
    print_table,
    setup_torch,
    tiny_llama_config,
    write_json,
)

IA3_KWARGS = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                  task_type="CAUSAL_LM")


def build(vocab: int, seed: int):
    """Ours and HF PEFT's IA3 models on identical base weights and identical (non-identity) vectors."""
    import peft
    import torch
    from peft_core import get_peft_model
    from peft_ia3 import IA3Config

    fresh = base_factory(tiny_llama_config(vocab), seed)

    ours = get_peft_model(fresh(), IA3Config(**IA3_KWARGS))
    theirs = peft.get_peft_model(fresh(), peft.IA3Config(**IA3_KWARGS))
    def vectors(model, live_infix: str) -> dict:  # parameter name without the adapter name -> parameter
        return {n.replace(live_infix, ".ia3_l"): p for n, p in model.named_parameters() if "ia3_l" in n}

    theirs_vectors = vectors(theirs, ".ia3_l.default")
    ours_vectors = vectors(ours, ".adapters.default.ia3_l")
    assert sorted(ours_vectors) == sorted(theirs_vectors) and ours_vectors, "IA3 parameters differ"
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in theirs_vectors.items():
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            ours_vectors[name].copy_(param)
    return ours, theirs, ours_vectors, theirs_vectors


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke test, not a measurement")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_torch(1)
    vocab = 8192
    ours, theirs, ours_vectors, theirs_vectors = build(vocab, args.seed)
    ids, labels = inputs(vocab, args.seed)

    for model in (ours, theirs):  # same loss and gradients, or the timing compares different work
        model.train()
        model(input_ids=ids, labels=labels).loss.backward()
    loss_diff = max_diff(ours(input_ids=ids, labels=labels).loss, theirs(input_ids=ids, labels=labels).loss)
    grad_diff = max(max_diff(p.grad, theirs_vectors[n].grad) for n, p in ours_vectors.items())
    if loss_diff > 1e-4 or grad_diff > 1e-4:
        raise SystemExit(f"IA3 models differ: loss {loss_diff}, gradients {grad_diff}")
    print(f"verified: loss diff {loss_diff:.2e}, IA3 gradient max diff {grad_diff:.2e}")

    figure = bench_training(ours, theirs, ids, labels, QUICK if args.quick else FULL)
    figure.name = "IA3 train step (fwd+bwd+AdamW)"
    print_table([figure])
    if args.json:
        write_json(args.json, {"environment": environment(1), "figures": [figure.as_dict()]})
    return 0 if figure.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
