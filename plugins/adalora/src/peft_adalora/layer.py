"""AdaLoRA's SVD-form adapters for ``nn.Linear`` and GPT-2's ``Conv1D``.

Each adapter computes ``out + s * B @ diag(E) @ A @ dropout(x)`` with ``A`` (r, in), ``E`` (r, 1) and
``B`` (out, r) stored as the parameters ``lora_A``, ``lora_E``, ``lora_B`` (the saved names), and
``s = scaling / (ranknum + 1e-5)``, ``ranknum = init_r``, as in Hugging Face PEFT. The allocator prunes a
rank by zeroing its entry of ``E``; a loaded adapter with a ``rank_pattern`` is built at its kept ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft_core.inject import LayerTable, check_rank
from peft_core.layer import Adapter
from torch import nn

from peft_adalora.config import AdaLoraConfig

RANKNUM_EPS = 1e-5  # Hugging Face PEFT's guard against ranknum 0, kept for identical numerics


class SVDAdapter(Adapter):
    """One layer's ``A``, ``E``, ``B``; ``transposed`` for ``Conv1D``, whose weight is stored ``(in, out)``."""

    def __init__(
        self, base_layer: nn.Module, config: AdaLoraConfig, module_name: str, adapter_name: str, transposed: bool
    ) -> None:
        super().__init__()
        self.transposed = transposed
        if transposed:
            in_features, out_features = base_layer.weight.shape
        else:
            in_features, out_features = base_layer.in_features, base_layer.out_features
        mask = config.mask_for(module_name, adapter_name)
        r = config.init_r if mask is None else sum(mask)
        check_rank(config, r, module_name, in_features, out_features)
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_E = nn.Parameter(torch.empty(r, 1))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.ranknum = float(config.init_r)  # not saved: Hugging Face PEFT derives it from init_r too
        self.scaling = float(config.lora_alpha) if config.lora_alpha > 0 else float(r)
        self.scale = self.scaling / (self.ranknum + RANKNUM_EPS)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        with torch.no_grad():
            if config.init_lora_weights:  # E = 0: the model starts unchanged
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            else:
                for param in (self.lora_A, self.lora_E, self.lora_B):
                    nn.init.normal_(param)

    @property
    def r(self) -> int:
        return self.lora_E.shape[0]

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # x: (..., in), out: (..., out)
        if self.r == 0:  # every singular value pruned (a loaded adapter)
            return out
        scaled_a = self.lora_A * self.lora_E  # (r, in)
        if x.dtype != scaled_a.dtype:
            x = x.to(scaled_a.dtype)
        hidden = F.linear(self.dropout(x), scaled_a)  # (..., r)
        if out.dtype != hidden.dtype:
            return out + (F.linear(hidden, self.lora_B) * self.scale).to(out.dtype)
        flat = torch.addmm(
            out.reshape(-1, out.shape[-1]), hidden.reshape(-1, self.r), self.lora_B.t(), alpha=self.scale
        )
        return flat.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ (A * E)`` in the base weight's stored layout."""
        delta = (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale  # (out, in)
        return delta.t() if self.transposed else delta

    def merged_weight(self, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight().to(weight.dtype)


def _linear(base: nn.Module, config: AdaLoraConfig, adapter_name: str, module_name: str) -> SVDAdapter:
    return SVDAdapter(base, config, module_name, adapter_name, transposed=False)


def _conv1d(base: nn.Module, config: AdaLoraConfig, adapter_name: str, module_name: str) -> SVDAdapter:
    return SVDAdapter(base, config, module_name, adapter_name, transposed=True)


ADALORA_LAYERS = LayerTable({
    "torch.nn.modules.linear.Linear": _linear,
    "transformers.pytorch_utils.Conv1D": _conv1d,
})
