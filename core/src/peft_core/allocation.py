"""A sanity check on sizes read from configs, before anything is allocated.

Configs come from strangers' files: ``num_virtual_tokens: 10**9`` must be refused with a clear error, not
by the operating system killing the process half-way through building an adapter.
"""

from __future__ import annotations

import os

import torch

from peft_core.errors import ConfigError


def memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Total memory of ``device`` (the machine's RAM for the CPU), or None where unknown."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_allocation(numel: int, what: str, fix: str, device: torch.device | str | None = None) -> None:
    """Raise :class:`ConfigError` if ``numel`` float32 values cannot fit in the device's whole memory."""
    total = memory_bytes(device)
    needed = numel * 4
    if total is not None and needed > total:
        raise ConfigError(
            f"{what} would need {needed / 2**30:,.1f} GiB for its weights, more than this device's "
            f"{total / 2**30:,.1f} GiB in all; {fix}"
        )
