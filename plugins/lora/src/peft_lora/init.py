"""How A and B start: each ``init_lora_weights`` choice is one small function."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from peft_core.errors import ConfigError
from peft_core.weights import read_weight, write_weight
from torch import nn

from peft_lora.config import pissa_iterations

if TYPE_CHECKING:
    from peft_lora.layer import LoraLinear


def init_lora_pair(lora_a: torch.Tensor, lora_b: torch.Tensor, init: bool | str) -> None:
    """Initialise a freshly allocated pair; with ``True`` or ``"gaussian"`` B is zero, so the update is.

    ``False`` draws both like PyTorch's default Linear initialisation (Kaiming-uniform).
    """
    if init == "gaussian":
        nn.init.normal_(lora_a, std=1 / lora_a.shape[0])
    else:
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
    else:
        nn.init.zeros_(lora_b)


def is_pissa(init: bool | str) -> bool:
    return init == "pissa" or pissa_iterations(init) is not None


def init_pissa(adapter: LoraLinear, init: str) -> None:
    """PiSSA: A and B take the weight's top-``r`` singular directions and the base keeps the rest.

    ``W = U S Vh``; with ``s`` the scaling, ``A = sqrt(S_r / s) Vh_r`` and ``B = U_r sqrt(S_r / s)``, so
    ``s * B @ A`` is the rank-``r`` part of ``W`` and the base weight becomes ``W - s * B @ A``: the model
    computes the same function at the start, and training moves the principal part.
    """
    weight = read_weight(adapter.base)
    if weight.is_meta:
        raise ConfigError("init_lora_weights='pissa' needs the base weights; load the model before get_peft_model.")
    dense = adapter._from_layout(weight.detach()).float()  # (out, in)
    r, scaling = adapter.r, adapter.scaling
    niter = pissa_iterations(init)
    if niter is None:
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(dense, q=r, niter=niter)
        vh = v.t()
    root = (s[:r] / scaling).sqrt()
    lora_a = root[:, None] * vh[:r]  # (r, in)
    lora_b = u[:, :r] * root[None, :]  # (out, r)
    with torch.no_grad():
        adapter.lora_A.weight.copy_(lora_a)
        adapter.lora_B.weight.copy_(lora_b)
        write_weight(adapter.base, adapter._to_layout(dense - scaling * lora_b @ lora_a))
