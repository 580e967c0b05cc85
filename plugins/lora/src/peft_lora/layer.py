"""LoRA adapters for Linear-like layers (``nn.Linear``, GPT-2's ``Conv1D``), ``nn.Conv2d`` and ``nn.Embedding``.

Each adapter computes ``out + scaling * B(A(dropout(x)))`` and can fold ``scaling * B @ A`` into the base
weight. DoRA (``use_dora``) rescales each output of the adapted layer by a learned magnitude divided by
the norm of the adapted weight's row, the norm held constant in the backward pass as the DoRA paper
suggests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft_core.errors import ConfigError
from peft_core.inject import LayerTable, check_rank
from peft_core.layer import Adapter
from peft_core.weights import read_weight
from torch import nn

from peft_lora.config import LoraConfig
from peft_lora.init import init_lora_pair, init_pissa, is_pissa


class FactorLinear(nn.Linear):
    """A LoRA factor: an ``nn.Linear`` left uninitialised, since ``init_lora_pair`` sets it once."""

    def reset_parameters(self) -> None:
        pass


class FactorConv2d(nn.Conv2d):
    """A LoRA factor: an ``nn.Conv2d`` left uninitialised, since ``init_lora_pair`` sets it once."""

    def reset_parameters(self) -> None:
        pass


class LoraAdapter(Adapter):
    """What the three layer kinds share: rank, scaling, dropout and, for DoRA, the magnitude vector."""

    def __init__(self, base_layer: nn.Module, config: LoraConfig, module_name: str) -> None:
        super().__init__()
        self.r = config.rank_for(module_name)
        alpha = config.alpha_for(module_name)
        self.scaling = alpha / (math.sqrt(self.r) if config.use_rslora else self.r)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        self.bind(base_layer)  # DoRA and PiSSA read its weight
        self._merge_scale: torch.Tensor | None = None  # the scale DoRA's merge applied, to undo it

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout."""
        raise NotImplementedError

    def _init_dora(self) -> None:
        self.lora_magnitude_vector = nn.Parameter(self._dora_norm(self._from_layout(read_weight(self.base))))

    def _dora_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-output norm of the adapted weight ``weight + delta``, shaped like the magnitude vector."""
        adapted = weight.to(self.lora_B.weight.dtype) + self.delta_weight()
        return torch.linalg.vector_norm(adapted, dim=tuple(range(1, adapted.dim())))

    def merged_weight(self, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight()
        if self.lora_magnitude_vector is None:
            return self._to_layout(self._from_layout(weight) + delta.to(weight.dtype))
        # In forward, DoRA rescales everything computed before it (base and earlier adapters), with the
        # norm of the unmerged base weight plus its own update; merging does the same to the weight.
        scale = self._magnitude_scale(self._from_layout(base_weight).to(delta.dtype) + delta)
        self._merge_scale = scale
        return self._to_layout(scale * (self._from_layout(weight).to(delta.dtype) + delta))

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight()
        if self.lora_magnitude_vector is None:
            return self._to_layout(self._from_layout(weight) - delta.to(weight.dtype))
        return self._to_layout(self._from_layout(weight).to(delta.dtype) / self._merge_scale - delta)

    def _magnitude_scale(self, adapted: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(adapted, dim=tuple(range(1, adapted.dim())), keepdim=True)
        return self.lora_magnitude_vector.view(norm.shape) / norm.detach()

    # The base weight's stored layout versus (out, in, ...): only Conv1D differs.
    def _from_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _to_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class LoraLinear(LoraAdapter):
    """LoRA for ``nn.Linear`` and for GPT-2's ``Conv1D`` (weight stored as ``(in, out)``)."""

    def __init__(self, base_layer: nn.Module, config: LoraConfig, module_name: str, transposed: bool) -> None:
        super().__init__(base_layer, config, module_name)
        self.transposed = transposed
        if transposed:  # Conv1D stores (in, out)
            in_features, out_features = base_layer.weight.shape
        else:  # from the layer, not the weight: a quantized weight is stored packed
            in_features, out_features = base_layer.in_features, base_layer.out_features
        check_rank(config, self.r, module_name, in_features, out_features)
        self.lora_A = FactorLinear(in_features, self.r, bias=False)  # (r, in)
        self.lora_B = FactorLinear(self.r, out_features, bias=False)  # (out, r)
        init_lora_pair(self.lora_A.weight, self.lora_B.weight, config.init_lora_weights)
        if is_pissa(config.init_lora_weights):
            init_pissa(self, config.init_lora_weights)
        if config.use_dora:
            self._init_dora()

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # x: (..., in), out: (..., out)
        lora_a, lora_b = self.lora_A.weight, self.lora_B.weight
        if x.dtype != lora_a.dtype:
            x = x.to(lora_a.dtype)
        x = self.dropout(x)
        if self.lora_magnitude_vector is not None:
            return self._dora_forward(x, out)
        hidden = F.linear(x, lora_a)  # (..., r)
        if out.dtype != hidden.dtype:
            return out + (F.linear(hidden, lora_b) * self.scaling).to(out.dtype)
        # One fused kernel for out + scaling * hidden @ B^T instead of a matmul, a scale and an add.
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, self.r), lora_b.t(), alpha=self.scaling)
        return flat.view(out.shape)

    @classmethod
    def forward_mixed(cls, adapters, index, x, out, cache):
        """Each sample's own LoRA in two batched matmuls: its A and B (scaled, zero-padded to the largest
        rank, zero for samples without one) gathered per sample."""
        if any(a.lora_magnitude_vector is not None for a in adapters):
            return super().forward_mixed(adapters, index, x, out, cache)  # DoRA: one adapter at a time
        down, up = _stacked_factors(adapters, cache)  # (slots + 1, in, r), (slots + 1, r, out)
        batch = x.shape[0]
        # index_select, not down[index]: the same gather, several times faster on the CPU.
        down, up = torch.index_select(down, 0, index), torch.index_select(up, 0, index)
        hidden = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(down.dtype), down)  # (batch, tokens, r)
        if out.dtype != up.dtype or not out.is_contiguous():
            return out + torch.bmm(hidden, up).view(out.shape).to(out.dtype)
        # Added into the base output inside the matmul: a separate add would cost a full pass over it.
        out.view(batch, -1, out.shape[-1]).baddbmm_(hidden, up)
        return out

    def _dora_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        weight = self._from_layout(read_weight(self.base)).to(x.dtype)
        scale = self._magnitude_scale(weight + self.delta_weight()).view(-1)  # (out,)
        lora = F.linear(F.linear(x, self.lora_A.weight), self.lora_B.weight) * self.scaling
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base.bias
            base = out.to(x.dtype) - bias if bias is not None else out.to(x.dtype)
        else:  # the base output saw the undropped input; the rescaled part uses the dropped one
            base = F.linear(x, weight)
        return out + ((scale - 1) * base + scale * lora).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    def _from_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.transposed else weight

    def _to_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.transposed else weight


def _stacked_factors(adapters, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A^T and scaling * B^T of every adapter of the layer, stacked, plus a zero slot for samples without one.

    Rebuilt only when an adapter or one of its weights changed (a tensor's version counts its in-place
    updates), so serving pays for the stacking once; it holds a copy of the layer's LoRA weights. The
    entry is read and written whole, so concurrent calls never see each other's halves.
    """
    key = tuple((id(a), a.lora_A.weight._version, a.lora_B.weight._version, a.scaling) for a in adapters)
    entry = cache.get("stacked")
    if entry is not None and entry[0] == key:
        return entry[1]
    rank = max(a.r for a in adapters)
    reference = adapters[0].lora_A.weight
    in_features, out_features = reference.shape[1], adapters[0].lora_B.weight.shape[0]
    down = reference.new_zeros(len(adapters) + 1, in_features, rank)
    up = reference.new_zeros(len(adapters) + 1, rank, out_features)
    with torch.no_grad():
        for slot, adapter in enumerate(adapters):
            down[slot, :, : adapter.r] = adapter.lora_A.weight.t()
            up[slot, : adapter.r] = adapter.lora_B.weight.t() * adapter.scaling
    cache["stacked"] = (key, (down, up))
    return down, up


class LoraConv2d(LoraAdapter):
    """LoRA for ``nn.Conv2d``: A is a convolution with the base's kernel into ``r`` channels, B a 1x1."""

    def __init__(self, base_layer: nn.Conv2d, config: LoraConfig, module_name: str) -> None:
        super().__init__(base_layer, config, module_name)
        if base_layer.groups != 1:
            raise ConfigError(f"LoRA supports Conv2d with groups=1 only; '{module_name}' has {base_layer.groups}.")
        fan_in = base_layer.in_channels * math.prod(base_layer.kernel_size)
        check_rank(config, self.r, module_name, fan_in, base_layer.out_channels)
        self.lora_A = FactorConv2d(
            base_layer.in_channels, self.r, base_layer.kernel_size, base_layer.stride, base_layer.padding,
            base_layer.dilation, bias=False,
        )
        self.lora_B = FactorConv2d(self.r, base_layer.out_channels, 1, 1, bias=False)
        init_lora_pair(self.lora_A.weight, self.lora_B.weight, config.init_lora_weights)
        if config.use_dora:
            self._init_dora()
            # Stored as (1, out, 1, 1), the layout of the saved format.
            self.lora_magnitude_vector = nn.Parameter(self.lora_magnitude_vector.data.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # x: (B, in, H, W), out: (B, out, H', W')
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        lora = self.lora_B(self.lora_A(x)) * self.scaling
        if self.lora_magnitude_vector is None:
            return out + lora.to(out.dtype)
        weight = read_weight(self.base).to(x.dtype)
        scale = self._magnitude_scale(weight + self.delta_weight()).view(1, -1, 1, 1)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base.bias
            base = out.to(x.dtype) - bias.view(1, -1, 1, 1) if bias is not None else out.to(x.dtype)
        else:
            base = F.conv2d(x, weight, None, self.base.stride, self.base.padding, self.base.dilation)
        return out + ((scale - 1) * base + scale * lora).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        # delta[o, i, kh, kw] = sum_r B[o, r] * A[r, i, kh, kw]
        return torch.einsum("or,rihw->oihw", self.lora_B.weight[:, :, 0, 0], self.lora_A.weight) * self.scaling


class LoraEmbedding(LoraAdapter):
    """LoRA for ``nn.Embedding``: a low-rank table ``A`` looked up by token, projected by ``B``."""

    def __init__(self, base_layer: nn.Embedding, config: LoraConfig, module_name: str) -> None:
        super().__init__(base_layer, config, module_name)
        if config.use_dora:
            raise ConfigError(
                f"use_dora is supported on Linear, Conv1D and Conv2d layers, not on the embedding "
                f"'{module_name}'; add it to exclude_modules or drop it from target_modules."
            )
        check_rank(config, self.r, module_name, base_layer.num_embeddings, base_layer.embedding_dim)
        # Saved names are the parameters' own: lora_embedding_A (r, num), lora_embedding_B (dim, r).
        self.lora_embedding_A = nn.Parameter(torch.empty(self.r, base_layer.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(base_layer.embedding_dim, self.r))
        init = config.init_lora_weights
        if init is False:
            nn.init.normal_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
        else:  # the table starts at zero so the model starts unchanged; B carries the randomness
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
        self.lookup = dict(
            padding_idx=base_layer.padding_idx, max_norm=base_layer.max_norm, norm_type=base_layer.norm_type,
            scale_grad_by_freq=base_layer.scale_grad_by_freq, sparse=base_layer.sparse,
        )

    # Embeddings have no dropout on their integer input.
    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # x: (...) token ids, out: (..., dim)
        rows = F.embedding(x, self.lora_embedding_A.t(), **self.lookup)  # (..., r)
        return out + (rows @ self.lora_embedding_B.t() * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling  # (num, dim)


def _linear(base: nn.Module, config: LoraConfig, adapter_name: str, module_name: str) -> LoraLinear:
    return LoraLinear(base, config, module_name, transposed=False)


def _conv1d(base: nn.Module, config: LoraConfig, adapter_name: str, module_name: str) -> LoraLinear:
    return LoraLinear(base, config, module_name, transposed=True)


def _conv2d(base: nn.Module, config: LoraConfig, adapter_name: str, module_name: str) -> LoraConv2d:
    return LoraConv2d(base, config, module_name)


def _embedding(base: nn.Module, config: LoraConfig, adapter_name: str, module_name: str) -> LoraEmbedding:
    return LoraEmbedding(base, config, module_name)


LORA_LAYERS = LayerTable({
    "torch.nn.modules.linear.Linear": _linear,
    "transformers.pytorch_utils.Conv1D": _conv1d,
    "torch.nn.modules.conv.Conv2d": _conv2d,
    "torch.nn.modules.sparse.Embedding": _embedding,
})
