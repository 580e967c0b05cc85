"""Saved adapters as another library (or a stranger) would write them, for tests of what loading refuses."""

from __future__ import annotations

import os
from pathlib import Path


def strip_checksums(directory: str | os.PathLike) -> None:
    """Rewrite the adapter's weights without this library's checksums, as Hugging Face PEFT writes them.

    Weights saved by this library record the SHA-256 of their config, so a config edited by hand no longer
    loads (see :func:`peft_core.serialization.read_adapter`). A test that edits a saved config to stand for a
    hostile or foreign adapter calls this first: such files carry no checksum, and every other check
    still applies to them.
    """
    from safetensors.torch import load_file, save_file

    path = Path(directory, "adapter_model.safetensors")
    save_file(load_file(path), path, metadata={"format": "pt"})
