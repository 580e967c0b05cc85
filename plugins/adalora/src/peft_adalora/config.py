"""``AdaLoraConfig``: the fields and meanings of Hugging Face PEFT's AdaLoRA, in the same file format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peft_core.config import _ANY, LayerConfig, check_finite
from peft_core.errors import ConfigError
from peft_lora.config import BIAS_CHOICES, LoraConfig


@dataclass
class AdaLoraConfig(LayerConfig):
    """Adaptive LoRA: each target layer learns ``W + s * B @ diag(E) @ A`` and ranks move between layers.

    Every layer starts with ``init_r`` singular triplets (rows of ``lora_A``, entries of ``lora_E``,
    columns of ``lora_B``). The rank allocator (``peft_adalora.update_and_allocate``, called after each
    optimizer step) keeps all of them for ``tinit`` steps, then zeroes the least important singular values
    (importance ``|w * grad|`` smoothed with ``beta1``, times its uncertainty smoothed with ``beta2``)
    every ``deltaT`` steps, the total budget falling on a cubic curve from ``init_r`` to ``target_r`` per
    layer on average, reached at step ``total_step - tfinal`` and then kept. ``orth_reg_weight`` weighs a
    penalty that keeps ``A`` and ``B`` near orthogonal. ``rank_pattern`` is written by the allocator
    (module name + ``.lora_E`` -> which triplets are kept) and read back when an adapter is loaded.
    ``lora_alpha`` / ``lora_dropout`` / ``bias`` mean what they mean for LoRA; the scale is
    ``lora_alpha / init_r``.
    """

    PEFT_TYPE: ClassVar[str] = "ADALORA"
    # Hugging Face PEFT writes its LoRA fields too; "r" is unused by AdaLoRA (init_r is the rank).
    IGNORED_FIELDS: ClassVar[dict[str, Any]] = {**LoraConfig.IGNORED_FIELDS, "r": _ANY}

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, Any] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    init_lora_weights: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"AdaLoraConfig.{name} must be a positive integer, not {value!r}.")
        if self.target_r > self.init_r:
            raise ConfigError(
                f"AdaLoraConfig.target_r ({self.target_r}) is larger than init_r ({self.init_r}); the allocator "
                f"only removes ranks. Set init_r >= target_r."
            )
        if self.total_step is None or not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ConfigError(
                "AdaLoraConfig needs total_step, the number of optimizer steps of the training run (a positive "
                f"integer), to schedule the rank budget; got {self.total_step!r}."
            )
        if self.tinit < 0 or self.tfinal < 0:
            raise ConfigError(f"tinit and tfinal must be >= 0, not {self.tinit!r} and {self.tfinal!r}.")
        if self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(
                f"tinit ({self.tinit}) + tfinal ({self.tfinal}) must be smaller than total_step "
                f"({self.total_step}), or no step is left to allocate ranks. Lower tinit/tfinal or raise total_step."
            )
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"AdaLoraConfig.{name} must be in (0, 1), not {getattr(self, name)!r}.")
        if not self.orth_reg_weight >= 0:  # NaN too
            raise ConfigError(f"orth_reg_weight must be >= 0, not {self.orth_reg_weight!r}.")
        check_finite("AdaLoraConfig", "orth_reg_weight", self.orth_reg_weight)
        check_finite("AdaLoraConfig", "lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), not {self.lora_dropout!r}.")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {BIAS_CHOICES}, not {self.bias!r}.")
        if self.init_lora_weights not in (True, False):
            raise ConfigError(f"AdaLoRA's init_lora_weights must be True or False, not {self.init_lora_weights!r}.")
        for key, kept in (self.rank_pattern or {}).items():
            is_mask = isinstance(kept, list) and len(kept) == self.init_r and all(isinstance(k, bool) for k in kept)
            is_count = isinstance(kept, int) and not isinstance(kept, bool) and 0 <= kept <= self.init_r
            if not (is_mask or is_count):
                raise ConfigError(
                    f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of init_r={self.init_r} booleans (which "
                    f"triplets are kept) or a count from 0 to init_r, not {kept!r}."
                )

    def mask_for(self, module_name: str, adapter_name: str = "default") -> list[bool] | None:
        """Which of the ``init_r`` triplets of ``module_name`` are kept, from ``rank_pattern`` (None: all)."""
        if not self.rank_pattern:
            return None
        for key in (f"{module_name}.lora_E", f"{module_name}.lora_E.{adapter_name}"):
            if key in self.rank_pattern:
                value = self.rank_pattern[key]
                if isinstance(value, int) and not isinstance(value, bool):
                    return [True] * value
                return [bool(v) for v in value]
        return None
