"""Fine-tune SmolLM2-135M-Instruct with LoRA to rewrite dates, on a CPU, in a few minutes.

What it does, in order:
  1. loads the model (converting the bundled GGUF file once, see model.py) and scores it on the test set;
  2. wraps it with a LoRA adapter and trains only the adapter, with the run `peft train` makes
     (peft_train: transformers' Trainer, AdamW, linear warm-up and decay), which saves the adapter;
  3. scores it again, reloads the saved adapter into a fresh base model and checks the reloaded
     model answers exactly as the trained one;
  4. merges the adapter into the base weights and checks the merged model matches the unmerged one.

Run from the repository root:

    python examples/smollm2_lora/train.py            # full run, 4-5 minutes on 2 CPU cores
    python examples/smollm2_lora/train.py --quick    # smoke test: 6 steps, 16 test examples
"""

from __future__ import annotations

import os

# Idle OpenMP threads normally spin, waiting for work. With torch using every core, anything else
# running at the same time (a test suite, a second torch process) makes those spinning threads fight
# over the cores: a training step here went from ~2s to ~45s. Sleeping instead costs about a quarter
# of the speed on an otherwise idle machine. The runtime reads this once, when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from model import cache_dir, load_model_and_tokenizer
from peft_core import PeftModel, get_peft_model
from peft_lora import LoraConfig
from peft_train.data import make_collator
from peft_train.training import TrainSettings
from peft_train.training import train as train_adapter
from transformers import PreTrainedModel, PreTrainedTokenizerBase

HERE = Path(__file__).resolve().parent
SYSTEM_PROMPT = "Answer briefly."  # short on purpose: the template's default system prompt is ~20 tokens
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE_INDEX = -100  # label that cross_entropy skips: prompt and padding tokens


@dataclass
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]  # the answer's tokens, then end-of-turn, so the model also learns to stop
    answer: str


def load_examples(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # Prompt and answer are tokenized separately, so training sees exactly the prompt tokens that
        # generation starts from. The chat template already holds every special token it needs.
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = [*tokenizer(row["answer"], add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        examples.append(Example(prompt_ids, answer_ids, row["answer"]))
    return examples


def collate(examples: Sequence[Example], pad_id: int, with_answer: bool, left_pad: bool) -> dict[str, torch.Tensor]:
    """Pad a batch into tensors. Generation needs left padding, so that every row ends where the
    answer should start; for a forward pass over whole examples either side works."""
    rows, labels = [], []
    for ex in examples:
        answer = ex.answer_ids if with_answer else []
        rows.append(ex.prompt_ids + answer)
        labels.append([IGNORE_INDEX] * len(ex.prompt_ids) + answer)
    width = max(map(len, rows))

    def pad(seq: list[int], fill: int) -> list[int]:
        filler = [fill] * (width - len(seq))
        return filler + seq if left_pad else seq + filler

    return {
        "input_ids": torch.tensor([pad(row, pad_id) for row in rows]),
        "attention_mask": torch.tensor([pad([1] * len(row), 0) for row in rows]),
        "labels": torch.tensor([pad(label, IGNORE_INDEX) for label in labels]),
    }


def batches(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the answer tokens only, and how many answer tokens there were."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]  # the logits at position t predict the token at t + 1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int
) -> list[str]:
    """Greedy answers, batched."""
    model.eval()
    # A little room past the longest answer: enough to tell a right answer from one that rambles on.
    max_new_tokens = max(len(ex.answer_ids) for ex in examples) + 2
    answers = []
    for chunk in batches(examples, batch_size):
        batch = collate(chunk, tokenizer.pad_token_id, with_answer=False, left_pad=True)
        output = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int
) -> tuple[float, float, list[str]]:
    """Mean loss per answer token, exact-match accuracy of the greedy answers, and the answers."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    for chunk in batches(examples, batch_size):
        loss, count = answer_loss(model, collate(chunk, tokenizer.pad_token_id, with_answer=True, left_pad=False))
        loss_sum, tokens = loss_sum + loss.item(), tokens + count
    answers = generate_answers(model, tokenizer, examples, batch_size)
    score = sum(answer == ex.answer for answer, ex in zip(answers, examples, strict=True)) / len(examples)
    return loss_sum / tokens, score, answers


@torch.no_grad()
def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train(
    model: torch.nn.Module, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace
) -> list[float]:
    """Train whatever requires grad (the LoRA weights) as `peft train` does, on transformers' Trainer; save the
    adapter to args.output_dir; return each step's loss."""
    features = [
        {"input_ids": ex.prompt_ids + ex.answer_ids, "labels": [IGNORE_INDEX] * len(ex.prompt_ids) + ex.answer_ids}
        for ex in examples
    ]
    settings = TrainSettings(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        # Linear warm-up over the first 10% of steps, then linear decay to zero, so the last steps
        # settle on an answer instead of bouncing around it.
        schedule="linear", max_grad_norm=1.0,
        use_cpu=True,  # the checks below run on the CPU, where the model was loaded
    )
    result = train_adapter(model, features, make_collator(tokenizer), settings, args.output_dir)
    return result.losses


def show_answers(title: str, loss: float, score: float, examples: Sequence[Example], answers: list[str]) -> None:
    print(f"\n{title}: test loss {loss:.3f}, exact match {score:.1%}")
    for ex, answer in list(zip(examples, answers, strict=True))[:3]:
        print(f"    {'ok ' if answer == ex.answer else 'BAD'} expected {ex.answer!r:20} got {answer[:40]!r}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r; lora_alpha is 2r")
    parser.add_argument("--seed", type=int, default=0)
    # Generating a few tokens costs about the same for 1 or 100 rows on a CPU, so evaluate in one batch.
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--output-dir", type=Path, default=HERE / "outputs" / "adapter", help="adapter goes here")
    parser.add_argument("--quick", action="store_true", help="smoke test: 6 steps, 16 test examples")
    args = parser.parse_args()
    if args.quick:
        args.steps = min(args.steps, 6)
    return args


def main() -> None:
    args = parse_args()
    run_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = time.perf_counter() - since
        return time.perf_counter()

    # One thread per core this process may use. os.cpu_count() would ignore CPU affinity limits
    # (containers, taskset), and more threads than cores slows CPU training down.
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)  # LoRA's A matrices are initialized at random; dropout too
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__} on CPU, {threads} threads; model cache {cache_dir()}")

    # -- 1. the base model, before training ------------------------------------------------------
    start = time.perf_counter()
    converting = not cache_dir().is_dir()
    base, tokenizer = load_model_and_tokenizer()
    start = lap("convert + load model" if converting else "load model", start)

    train_set = load_examples(args.data_dir / "train.jsonl", tokenizer)
    test_set = load_examples(args.data_dir / "test.jsonl", tokenizer)
    if args.quick:
        test_set = test_set[:16]
    print(f"task: rewrite an ISO date as 'D Month YYYY'; {len(train_set)} train / {len(test_set)} test examples")
    print(f"  prompt: {tokenizer.decode(test_set[0].prompt_ids)!r}")
    # A fixed batch to compare logits on, across disabling, saving, reloading and merging the adapter.
    probe_examples = test_set[:8]
    probe = collate(probe_examples, tokenizer.pad_token_id, with_answer=True, left_pad=False)

    base_loss, base_score, answers = evaluate(base, tokenizer, test_set, args.eval_batch_size)
    base_logits = logits_of(base, probe)
    start = lap("evaluate base", start)
    show_answers("BEFORE (base model)", base_loss, base_score, test_set, answers)

    # -- 2. LoRA training ------------------------------------------------------------------------
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.05,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)  # wraps `base` in place: only the LoRA weights train
    model.print_trainable_parameters()
    losses = train(model, train_set, tokenizer, args)
    start = lap("train", start)

    loss, score, answers = evaluate(model, tokenizer, test_set, args.eval_batch_size)
    start = lap("evaluate trained", start)
    show_answers(f"AFTER {args.steps} steps (final train loss {losses[-1]:.4f})", loss, score, test_set, answers)

    # -- 3. the adapter can be switched off, and reloaded from where training saved it ------------
    print()
    trained_logits = logits_of(model, probe)
    with model.disable_adapter():
        diff = (logits_of(model, probe) - base_logits).abs().max().item()
    print(f"adapter disabled vs. base model:  max |logit diff| {diff:.1e}")
    assert diff < 1e-5, "with the adapter disabled the model should be the base model"

    files = sorted(f for f in args.output_dir.iterdir() if f.name.startswith("adapter_"))
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"saved adapter to {args.output_dir}: {', '.join(f.name for f in files)} ({size_mb:.1f} MB)")

    fresh_base, _ = load_model_and_tokenizer()
    reloaded = PeftModel.from_pretrained(fresh_base, args.output_dir)
    reload_diff = (logits_of(reloaded, probe) - trained_logits).abs().max().item()
    same_answers = generate_answers(reloaded, tokenizer, probe_examples, len(probe_examples)) == answers[:8]
    print(f"reloaded vs. trained:             max |logit diff| {reload_diff:.1e}, same answers: {same_answers}")
    assert reload_diff < 1e-5, "the reloaded adapter should reproduce the trained model"
    assert same_answers, "the reloaded adapter should give the trained model's answers"

    # -- 4. merge the adapter into the base weights ----------------------------------------------
    unmerged_logits = logits_of(reloaded, probe)
    merged = reloaded.merge_and_unload()  # a plain transformers model again, LoRA folded into the weights
    assert isinstance(merged, PreTrainedModel), f"merge_and_unload() returned {type(merged)}"
    merged_logits = logits_of(merged, probe)
    merge_diff = (merged_logits - unmerged_logits).abs().max().item()
    print(f"merged vs. unmerged:              max |logit diff| {merge_diff:.1e}")
    # Not bit-identical: (W + s*B@A) @ x rounds differently from W @ x + s*B @ (A @ x), and 30 layers
    # add it up. The tolerance is float32 rounding on logits of magnitude ~10-40, relative + absolute.
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-4, atol=1e-4)
    merged_loss, merged_score, merged_answers = evaluate(merged, tokenizer, test_set, args.eval_batch_size)
    show_answers("MERGED", merged_loss, merged_score, test_set, merged_answers)
    assert merged_score == score, "the merged model should score exactly as the unmerged one"
    lap("save / reload / merge checks", start)
    timings["whole run"] = time.perf_counter() - run_start

    # -- summary ---------------------------------------------------------------------------------
    print("\n" + "=" * 78)
    print(f"SmolLM2-135M-Instruct + LoRA r={args.rank}: rewrite ISO dates as 'D Month YYYY'")
    print(f"  {len(train_set)} train / {len(test_set)} test examples, {args.steps} steps of {args.batch_size}")
    print(f"  {'':16}{'test loss':>10}{'exact match':>13}")
    for name, row_loss, row_score in [("base", base_loss, base_score), ("LoRA", loss, score)]:
        print(f"  {name:16}{row_loss:>10.3f}{row_score:>13.1%}")
    print(f"  {'LoRA, merged':16}{merged_loss:>10.3f}{merged_score:>13.1%}")
    print(f"  checks passed: adapter off = base, reload = trained, merge max |logit diff| {merge_diff:.1e}")
    print("  wall time: " + ", ".join(f"{name} {secs:.0f}s" for name, secs in timings.items()))
    print(f"  adapter: {args.output_dir}")
    print("=" * 78)


if __name__ == "__main__":
    main()
