"""The training examples of ``peft train``: reading files, tokenizing rows into features, padding batches.

A feature is ``{"input_ids": [...], "labels": [...]}``; labels are ``-100`` where nothing is learned (the
prompt of a prompt/completion row, and padding). Torch and transformers are imported inside functions.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_core.errors import PeftError

if TYPE_CHECKING:
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label the loss skips: padding and prompt tokens


def read_records(path: Path) -> list[dict[str, Any]]:
    """The raw rows of a JSONL, CSV/TSV or TXT file, or of a ``datasets`` ``save_to_disk`` folder."""
    if not path.exists():
        raise PeftError(f"data not found: {path}; check the --data path")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PeftError(f"{path}:{number}: not valid JSON ({exc.msg}); write one object a line") from None
        return rows
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".txt":
        return [{"text": line} for line in text.splitlines() if line.strip()]
    raise PeftError(f"unsupported data file {path.name}: use .jsonl, .csv, .tsv, .txt or a save_to_disk folder")


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise PeftError(
            f"{path} is a folder, read as a dataset saved with datasets' save_to_disk, which needs the datasets "
            "package: pip install datasets (or pip install 'peft-train[datasets]'); or pass a .jsonl file"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise PeftError(f"{path} is a DatasetDict without a 'train' split (splits: {', '.join(loaded)}); "
                            "save the training split as 'train'")
        loaded = loaded["train"]
    return [dict(row) for row in loaded]


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    system_prompt: str | None = None,
    chat_template: bool = False,
) -> list[dict[str, list[int]]]:
    """Rows with ``text`` train on every token; rows with ``prompt`` and ``completion`` (or ``answer``)
    train on the completion only, so the model learns to answer rather than to repeat prompts."""
    features = []
    for number, row in enumerate(records, 1):
        completion = row.get("completion", row.get("answer"))
        if "prompt" in row and completion is not None:
            prompt = str(row["prompt"])
            if chat_template:
                messages = [{"role": "user", "content": prompt}]
                if system_prompt:
                    messages.insert(0, {"role": "system", "content": system_prompt})
                prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                # The template holds every special token the prompt needs; adding more would shift it.
                prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            else:
                prompt_ids = tokenizer(prompt).input_ids
            answer_ids = tokenizer(str(completion), add_special_tokens=False).input_ids
            if tokenizer.eos_token_id is not None:
                answer_ids.append(tokenizer.eos_token_id)  # so the model also learns to stop
            ids = prompt_ids + answer_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        elif "text" in row and row["text"] is not None:
            ids = tokenizer(str(row["text"])).input_ids
            labels = list(ids)
        else:
            raise PeftError(f"example {number} has neither 'text' nor 'prompt' + 'completion' (keys: {sorted(row)}); "
                            "see the data formats in docs/cli-train.md")
        if max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):  # else there is nothing to predict
            features.append({"input_ids": ids, "labels": labels})
    if not features:
        raise PeftError("no usable example in the data (empty, or every example truncated away); "
                        "check the file, or raise --max-length")
    return features


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """transformers' padding collator: ``input_ids`` padded with the pad token (the end-of-sequence token when
    the tokenizer has none), an ``attention_mask``, ``labels`` padded with -100, on the right."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise PeftError("the tokenizer has neither a pad nor an end-of-sequence token; add a pad token to the "
                            "model's tokenizer files")
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding (some chat tokenizers default to it, for generation) would shift the positions of the
    # real tokens in training; on the right, padding changes nothing the loss sees.
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
