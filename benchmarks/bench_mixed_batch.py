"""Mixed-batch LoRA inference (a different adapter per sample) against Hugging Face PEFT, on the CPU.

Sixteen LoRA adapters (r=16, all seven projections, random non-zero weights, identical in both libraries)
on the tiny Llama of bench_lora.py; a batch of 32 x 64 tokens where every adapter serves two samples.
After checking that both libraries give the same logits (and that these differ between adapters), it
times ``model(input_ids, adapter_names=[...])`` in both, and ours against the base model's own forward
(adapters disabled), with interleaved rounds as bench_lora.py does.

    .venv/bin/python benchmarks/bench_mixed_batch.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import (
    LORA_KWARGS,
    Figure,
    base_factory,
    interleaved,
    lora_key,
    max_diff,
    report,
    setup_torch,
    timed,
    tiny_llama_config,
)

ADAPTERS, BATCH, SEQ = 16, 32, 64


def build(vocab: int, seed: int):
    """Ours and HF PEFT's models with the same sixteen adapters, and the per-sample adapter names."""
    import peft
    import torch
    from peft_core import get_peft_model
    from peft_lora import LoraConfig

    fresh = base_factory(tiny_llama_config(vocab), seed)
    names = [f"a{i}" for i in range(ADAPTERS)]
    ours = get_peft_model(fresh(), LoraConfig(**LORA_KWARGS), names[0])
    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(**LORA_KWARGS), names[0])
    for name in names[1:]:
        ours.add_adapter(name, LoraConfig(**LORA_KWARGS))
        theirs.add_adapter(name, peft.LoraConfig(**LORA_KWARGS))
    generator = torch.Generator().manual_seed(seed + 1)
    theirs_params = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    ours_params = {n: p for n, p in ours.named_parameters() if "lora_" in n}

    def key(name: str, adapter: str) -> str:  # the same for both libraries
        return lora_key(name.replace(f".adapters.{adapter}.", ".").replace(f".{adapter}.", "."))

    with torch.no_grad():
        for adapter in names:
            ours_of = {key(n, adapter): p for n, p in ours_params.items() if f".adapters.{adapter}." in n}
            for name, param in theirs_params.items():
                if f".{adapter}." in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
                    ours_of[key(name, adapter)].copy_(param)
    order = torch.randperm(BATCH, generator=generator).tolist()
    per_sample = [names[i % ADAPTERS] for i in order]
    for model in (ours, theirs):
        model.eval()
    return ours, theirs, per_sample


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke test, not a measurement")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_torch(1)
    vocab = 8192
    ours, theirs, per_sample = build(vocab, args.seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(args.seed + 2))

    with torch.inference_mode():
        ours_logits = ours(input_ids=ids, adapter_names=per_sample).logits
        theirs_logits = theirs(input_ids=ids, adapter_names=per_sample).logits
        with ours.disable_adapter():
            base_logits = ours(input_ids=ids).logits
    diff, effect = max_diff(ours_logits, theirs_logits), max_diff(ours_logits, base_logits)
    if diff > 1e-4 or effect < 1e-2:
        raise SystemExit(f"mixed batches differ: ours vs HF {diff}, adapters vs base {effect}")
    print(f"verified: mixed-batch logits ours vs HF max diff {diff:.2e}; adapters change them by {effect:.2e}")

    def mixed(model):
        def run():
            with torch.inference_mode():
                model(input_ids=ids, adapter_names=per_sample)
        return timed(run)

    def base():
        with torch.inference_mode(), ours.disable_adapter():
            ours(input_ids=ids)

    repeats, warmup = (3, 1) if args.quick else (15, 2)
    times = interleaved({"theirs": mixed(theirs), "ours": mixed(ours), "base": timed(base)}, repeats, warmup)
    figures = [
        Figure(f"mixed batch, {ADAPTERS} LoRAs", times["ours"], times["theirs"], 0.90),
        Figure("mixed batch vs base forward", times["ours"], times["base"], 1.10, theirs_label="base model",
               notes="the same batch through the plain model, adapters disabled"),
        Figure("HF mixed batch vs base forward", times["theirs"], times["base"], float("inf"),
               theirs_label="base model", notes="for reference: HF PEFT's own overhead"),
    ]
    return report(figures, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
