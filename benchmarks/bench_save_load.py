"""Saving and loading a LoRA adapter against Hugging Face PEFT, in one process, on the tiny Llama of bench_lora.py.

Same method as bench_lora.py (interleaved rounds, one thread, median of per-round ratios). Our saves
stage the files and commit them with one rename, and write the checksums of config and tensors; our loads
take a shared lock on the folder and verify those checksums. These figures say what that costs:

- save: ``save_pretrained`` of the same adapter (LoRA r=64 on all seven projections, 9.5 MiB);
- load: ``PeftModel.from_pretrained`` of that adapter onto a fresh base (the base's construction is not
  timed), each library loading its own files; the script first checks both give the same logits.

    .venv/bin/python benchmarks/bench_save_load.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import (
    Figure,
    base_factory,
    environment,
    inputs,
    interleaved,
    max_diff,
    print_table,
    setup_torch,
    share_lora_weights,
    stopwatch,
    tiny_llama_config,
    write_json,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke test, not a measurement")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_torch(1)

    import peft
    from peft_core import PeftModel, get_peft_model
    from peft_lora import LoraConfig

    vocab = 8192
    config = tiny_llama_config(vocab)
    fresh = base_factory(config, args.seed)
    settings = dict(r=64, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    ours = get_peft_model(fresh(), LoraConfig(**settings))
    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(**settings))
    share_lora_weights(ours, theirs, config.num_hidden_layers, args.seed)
    template = fresh()  # each load gets a deep copy of it, made outside the timed region
    ids, _ = inputs(vocab, args.seed)

    root = Path(tempfile.mkdtemp(prefix="bench-save-load-"))
    ours.save_pretrained(root / "ours")
    theirs.save_pretrained(root / "theirs")
    loaded = {"ours": PeftModel.from_pretrained(copy.deepcopy(template), root / "ours"),
              "theirs": peft.PeftModel.from_pretrained(copy.deepcopy(template), root / "theirs")}
    diff = max_diff(loaded["ours"](input_ids=ids).logits, loaded["theirs"](input_ids=ids).logits)
    if diff > 1e-4:
        raise SystemExit(f"loaded adapters differ: logits max diff {diff}")
    print(f"verified: loaded logits max diff {diff:.2e}; adapter file "
          f"{(root / 'ours' / 'adapter_model.safetensors').stat().st_size / 2**20:.1f} MiB")

    def save(model, folder: str):
        return lambda: _timed(lambda: model.save_pretrained(root / folder))

    def load(load_fn, folder: str):
        def run():
            base = copy.deepcopy(template)
            return _timed(lambda: load_fn(base, root / folder))
        return run

    repeats, warmup = (3, 1) if args.quick else (25, 3)
    saves = interleaved({"ours": save(ours, "ours"), "theirs": save(theirs, "theirs")}, repeats, warmup)
    loads = interleaved({"ours": load(PeftModel.from_pretrained, "ours"),
                         "theirs": load(peft.PeftModel.from_pretrained, "theirs")}, repeats, warmup)
    figures = [
        # HF PEFT writes the weights file in place, unflushed; ours writes both files into a staging folder,
        # flushes them, commits with one rename and moves them into place (5 fsyncs), and hashes the tensors.
        Figure("save_pretrained (r=64, 9.5 MiB)", saves["ours"], saves["theirs"], 1.60, clock="wall",
               notes="ours stages, fsyncs, commits and writes checksums; HF PEFT writes in place"),
        Figure("from_pretrained (r=64, 9.5 MiB)", loads["ours"], loads["theirs"], 1.10, clock="wall",
               notes="ours verifies the checksums of config and tensors"),
    ]
    print_table(figures)
    if args.json:
        write_json(args.json, {"environment": environment(1), "figures": [f.as_dict() for f in figures]})
    return 0 if all(f.passed for f in figures) else 1


def _timed(fn):
    stop = stopwatch()
    fn()
    return stop()


if __name__ == "__main__":
    raise SystemExit(main())
