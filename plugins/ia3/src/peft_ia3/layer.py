"""IA3 adapters: a learned vector scales a layer's output, or its input for feed-forward layers.

The vector ``ia3_l`` has the saved shape of Hugging Face PEFT: ``(out, 1)`` / ``(1, in)`` for Linear-like
layers, ``(1, out, 1, 1)`` / ``(1, in, 1, 1)`` for Conv2d.
"""

from __future__ import annotations

import torch
from peft_core.inject import LayerTable
from peft_core.layer import Adapter
from peft_core.walk import matches
from torch import nn

from peft_ia3.config import IA3Config


class IA3Adapter(Adapter):
    """Scales the output (``acts_on = "output"``) or, for a feed-forward layer, the input."""

    def __init__(self, shape: tuple[int, ...], config: IA3Config, feedforward: bool) -> None:
        super().__init__()
        self.acts_on = "input" if feedforward else "output"
        self.ia3_l = nn.Parameter(torch.empty(shape))
        if config.init_ia3_weights:
            nn.init.ones_(self.ia3_l)  # the identity: the model starts unchanged
        else:
            nn.init.normal_(self.ia3_l)

    # ``ia3_l`` as it broadcasts over the layer's input or output: channels last for Linear layers.
    BROADCAST_SHAPE: tuple[int, ...] = (-1,)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # input adapters: x -> l * x;  output adapters: (x, out) -> l * out
        target = x if out is None else out
        scale = self.ia3_l.view(self.BROADCAST_SHAPE)
        return target * (scale if scale.dtype == target.dtype else scale.to(target.dtype))

    @classmethod
    def forward_mixed(cls, adapters, index, x, out, cache):
        """Each sample scaled by its own vector, gathered from the stacked vectors (ones: no adapter)."""
        target = x if out is None else out
        scales = torch.ones(len(adapters) + 1, adapters[0].ia3_l.numel(), dtype=target.dtype, device=target.device)
        for slot, adapter in enumerate(adapters):
            scales[slot] = adapter.ia3_l.reshape(-1)
        per_sample = torch.index_select(scales, 0, index)  # (batch, channels)
        if cls.BROADCAST_SHAPE == (-1,):  # channels last
            per_sample = per_sample.view(target.shape[0], *[1] * (target.dim() - 2), -1)
        else:  # (batch, channels, height, width)
            per_sample = per_sample.view(target.shape[0], -1, 1, 1)
        return target * per_sample

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.acts_on == "input" else bias * self.ia3_l.view(-1).to(bias.dtype)

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.acts_on == "input" else bias / self.ia3_l.view(-1).to(bias.dtype)


class IA3Linear(IA3Adapter):
    """IA3 for ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored as ``(in, out)``)."""

    def __init__(self, base_layer: nn.Module, config: IA3Config, feedforward: bool, transposed: bool) -> None:
        if transposed:
            in_features, out_features = base_layer.weight.shape
        else:
            in_features, out_features = base_layer.in_features, base_layer.out_features
        super().__init__((1, in_features) if feedforward else (out_features, 1), config, feedforward)
        self.transposed = transposed

    def _scaled(self, weight: torch.Tensor, invert: bool) -> torch.Tensor:
        scale = self.ia3_l.to(weight.dtype)  # (out, 1) scales rows, (1, in) columns of (out, in)
        scale = scale.t() if self.transposed else scale
        return weight / scale if invert else weight * scale

    def merged_weight(self, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        return self._scaled(weight, invert=False)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._scaled(weight, invert=True)


class IA3Conv2d(IA3Adapter):
    """IA3 for ``nn.Conv2d``: one scale per output (or, feed-forward, input) channel."""

    def __init__(self, base_layer: nn.Conv2d, config: IA3Config, feedforward: bool) -> None:
        channels = base_layer.in_channels if feedforward else base_layer.out_channels
        super().__init__((1, channels, 1, 1), config, feedforward)

    BROADCAST_SHAPE = (1, -1, 1, 1)  # over (B, C, H, W)

    def _scaled(self, weight: torch.Tensor, invert: bool) -> torch.Tensor:
        # weight (out, in, kh, kw): output scales index dim 0, input scales dim 1
        scale = self.ia3_l.to(weight.dtype).view(1, -1, 1, 1) if self.acts_on == "input" \
            else self.ia3_l.to(weight.dtype).view(-1, 1, 1, 1)
        return weight / scale if invert else weight * scale

    def merged_weight(self, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        return self._scaled(weight, invert=False)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._scaled(weight, invert=True)


def _feedforward(config: IA3Config, module_name: str) -> bool:
    return bool(config.feedforward_modules) and \
        matches(module_name, config.feedforward_modules, "IA3Config.feedforward_modules")


IA3_LAYERS = LayerTable({
    "torch.nn.modules.linear.Linear":
        lambda base, config, adapter_name, name: IA3Linear(base, config, _feedforward(config, name), False),
    "transformers.pytorch_utils.Conv1D":
        lambda base, config, adapter_name, name: IA3Linear(base, config, _feedforward(config, name), True),
    "torch.nn.modules.conv.Conv2d":
        lambda base, config, adapter_name, name: IA3Conv2d(base, config, _feedforward(config, name)),
})
