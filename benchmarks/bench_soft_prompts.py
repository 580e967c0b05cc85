"""Prompt tuning, P-tuning and prefix tuning against Hugging Face PEFT, in one process, on the CPU.

Same method as bench_lora.py (interleaved rounds, one thread, CPU clock, median of per-round ratios),
on its tiny Llama with the KV cache on. For each method both libraries hold identical weights (ours are
copied from HF PEFT's), the script checks that loss and gradients agree, then times a training step
(forward, backward, AdamW) and greedy generation of 32 tokens from a batch of 4 x 32-token prompts.

    .venv/bin/python benchmarks/bench_soft_prompts.py [--quick] [--json PATH] [--only prompt p-tuning prefix]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import (
    FULL,
    QUICK,
    Figure,
    base_factory,
    bench_training,
    inputs,
    interleaved,
    max_diff,
    report,
    setup_torch,
    timed,
    tiny_llama_config,
)

VIRTUAL = 20
NEW_TOKENS, PROMPT_LENGTH = 32, 32
METHODS = ("prompt", "p-tuning", "prefix")


def configs(method: str):
    import peft
    from peft_p_tuning import PromptEncoderConfig
    from peft_prefix_tuning import PrefixTuningConfig
    from peft_prompt_tuning import PromptTuningConfig

    settings = dict(num_virtual_tokens=VIRTUAL, task_type="CAUSAL_LM")
    return {
        "prompt": (PromptTuningConfig(**settings), peft.PromptTuningConfig(**settings)),
        "p-tuning": (PromptEncoderConfig(**settings), peft.PromptEncoderConfig(**settings)),
        "prefix": (PrefixTuningConfig(**settings), peft.PrefixTuningConfig(**settings)),
    }[method]


def build(method: str, vocab: int, seed: int):
    """Ours and HF PEFT's model for ``method``, ours holding a copy of HF PEFT's prompt weights."""
    import peft
    import torch
    from peft_core import get_peft_model

    config = tiny_llama_config(vocab)
    config.use_cache = True
    fresh = base_factory(config, seed)
    ours_config, theirs_config = configs(method)
    ours, theirs = get_peft_model(fresh(), ours_config), peft.get_peft_model(fresh(), theirs_config)
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    theirs_params = [p for p in theirs.parameters() if p.requires_grad]
    # Same modules in the same order (table, then the encoder's layers): copy one onto the other.
    assert [p.shape for p in ours_params] == [p.shape for p in theirs_params], "prompt parameters differ"
    with torch.no_grad():
        for mine, theirs_param in zip(ours_params, theirs_params, strict=True):
            mine.copy_(theirs_param)
    return ours, theirs, ours_params, theirs_params


def verify(ours, theirs, ours_params, theirs_params, ids, labels) -> None:
    for model in (ours, theirs):
        model.train()
        model(input_ids=ids, labels=labels).loss.backward()
    loss_diff = max_diff(ours(input_ids=ids, labels=labels).loss, theirs(input_ids=ids, labels=labels).loss)
    grad_diff = max(max_diff(a.grad, b.grad) for a, b in zip(ours_params, theirs_params, strict=True))
    if loss_diff > 1e-4 or grad_diff > 1e-4:
        raise SystemExit(f"models differ: loss {loss_diff}, gradients {grad_diff}")
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        model.eval()
    print(f"verified: loss diff {loss_diff:.2e}, gradient max diff {grad_diff:.2e}")


def bench_generation(ours, theirs, prompt_ids, repeats: int, warmup: int) -> Figure:
    import torch

    def generate_fn(model):
        def generate():
            with torch.inference_mode():
                model.generate(input_ids=prompt_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=0)

        return timed(generate)

    times = interleaved({"ours": generate_fn(ours), "theirs": generate_fn(theirs)}, repeats, warmup)
    return Figure(f"generate {NEW_TOKENS} tokens (KV cache)", times["ours"], times["theirs"], 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke test, not a measurement")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_torch(1)
    reps = QUICK if args.quick else FULL
    vocab = 8192
    ids, labels = inputs(vocab, args.seed)
    prompt_ids = ids[:, :PROMPT_LENGTH]
    figures = []
    for method in args.only:
        ours, theirs, ours_params, theirs_params = build(method, vocab, args.seed)
        verify(ours, theirs, ours_params, theirs_params, ids, labels)
        train = bench_training(ours, theirs, ids, labels, reps)
        train.name = f"{method}: train step"
        generation = bench_generation(ours, theirs, prompt_ids, max(3, reps.infer // 3), reps.warmup)
        generation.name = f"{method}: generate {NEW_TOKENS} tokens"
        figures += [train, generation]
    return report(figures, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
