"""``peft merge``: fold an adapter into its base model and save a plain transformers model.

The result loads with ``transformers.AutoModel*.from_pretrained`` and needs neither this library nor the
adapter. The base is loaded in float32 so that the merge itself loses nothing; ``--dtype`` (or the base's
own dtype) is applied only to what is written.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from peft_core.cli import add_legacy_bin_option
from peft_core.directory_commit import leftovers, staged_commit
from peft_core.errors import PeftError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# The adapter's task type names the head it was trained with; it is the most direct choice of Auto class.
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
# Suffixes of transformers' architecture class names, for adapters that saved no task type.
ARCHITECTURE_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge", help="merge an adapter into its base model and save the result",
        description="Load the base model with transformers, load the adapter on it, merge the adapter into the "
        "weights and save a plain transformers model (with the base's tokenizer, if it has one) in --out.",
    )
    parser.add_argument("--base", required=True, metavar="MODEL_DIR", help="the base model (a saved transformers "
                        "model directory or a Hub repo id)")
    parser.add_argument("--adapter", required=True, metavar="PATH_OR_REPO", help="the adapter or stack to merge")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to save the merged model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the saved weights (default: the base's)")
    parser.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    add_legacy_bin_option(parser)
    parser.set_defaults(run=run)
    return parser


def auto_class_name(task_type: str | None, architectures: list[str] | None) -> str:
    """The transformers Auto class that loads the base for an adapter of ``task_type``.

    The adapter's task type wins; else the base's saved architecture; else a causal LM, the common case.
    """
    if task_type in TASK_AUTO_CLASSES:
        return TASK_AUTO_CLASSES[task_type]
    for architecture in architectures or []:
        for suffix, name in ARCHITECTURE_AUTO_CLASSES:
            if architecture.endswith(suffix):
                return name
    return "AutoModelForCausalLM"


def check_out(out: Path, force: bool) -> None:
    """Refuse to write over a file or, without ``force``, into a directory that holds anything."""
    if out.exists() and not out.is_dir():
        raise PeftError(f"--out {out} is a file; give a directory.")
    if out.is_dir() and set(os.listdir(out)) - set(leftovers(out)) and not force:
        raise PeftError(f"--out {out} is not empty; choose another directory or pass --force to write into it.")


def _base_config(base: str) -> dict[str, Any]:
    """The base's config.json as a dict, or {} for a Hub repo id (transformers resolves that itself)."""
    path = Path(base)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise PeftError(f"--base {base} has no config.json; it is not a saved transformers model.")
        with open(config) as f:
            return json.load(f)
    if path.exists() or base.startswith((".", "/")):
        raise PeftError(f"--base {base} is not a directory holding a saved transformers model.")
    return {}


def _adapter_task_type(adapter: str) -> str | None:
    from peft_core.serialization import read_config_dict, resolve_file
    from peft_core.stacking import MANIFEST_NAME, read_manifest

    # A stack's first member decides its task type, as it picks the PeftModel class on loading.
    manifest = resolve_file(adapter, MANIFEST_NAME, required=False)
    if manifest is None:
        return read_config_dict(adapter).get("task_type")
    first = read_manifest(manifest).names[0]
    return read_config_dict(adapter, subfolder=None if first == "default" else first).get("task_type")


def merge(
    base: str, adapter: str, out: str | os.PathLike, dtype: str | None = None, force: bool = False,
    allow_legacy_bin: bool = False,
) -> str:
    """Merge ``adapter`` into ``base`` and save the model in ``out``; return the Auto class name used."""
    import torch
    import transformers

    from peft_core.model import PeftModel

    out = Path(out)
    check_out(out, force)  # before the slow part, so a refusal costs nothing
    # A command's stderr is for its one-line errors: transformers' progress bars and notes would bury them.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    base_config = _base_config(base)
    class_name = auto_class_name(_adapter_task_type(adapter), base_config.get("architectures"))
    auto_class = getattr(transformers, class_name)
    model = auto_class.from_pretrained(base, dtype=torch.float32, trust_remote_code=False)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, allow_legacy_bin=allow_legacy_bin)
    except PeftError as exc:
        raise PeftError(f"The adapter {adapter} does not fit the base model {base}: {exc}") from exc
    merged = peft_model.merge_and_unload()
    saved_dtype = DTYPES.get(dtype or "") or base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    merged = merged.to(getattr(torch, saved_dtype))
    merged.config.dtype = saved_dtype  # so from_pretrained(dtype="auto") gives back this dtype
    tokenizer = None
    if any((Path(base) / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    # The model and tokenizer files change as one unit: a kill or a failure leaves --out as it was.
    with staged_commit(out) as staging:
        merged.save_pretrained(staging.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging.path)
    return class_name


def run(args: argparse.Namespace) -> int:
    class_name = merge(args.base, args.adapter, args.out, args.dtype, args.force, args.allow_legacy_bin)
    print(f"merged {args.adapter} into {args.base} ({class_name}); saved to {args.out}")
    return 0
