"""``LoraConfig``: the fields and meanings Hugging Face PEFT users know."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft_core.config import _ANY, LayerConfig, check_finite, check_regex
from peft_core.errors import ConfigError
from peft_core.patterns import NAME_SUFFIX, compile_pattern

INIT_CHOICES = (True, False, "gaussian", "pissa")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(LayerConfig):
    """Low-rank adaptation: each target layer learns ``W + (lora_alpha / r) * B @ A``.

    ``r``: rank of the update. ``lora_alpha``: its scale numerator (``use_rslora`` divides by
    ``sqrt(r)`` instead of ``r``). ``lora_dropout``: dropout on the adapter's input. ``bias``:
    which base biases also train and are saved (``"none"``, ``"all"``, ``"lora_only"``).
    ``use_dora``: weight-decomposed LoRA (a learned magnitude per output). ``init_lora_weights``:
    ``True`` (B = 0, so the model starts unchanged), ``False`` (random A and B), ``"gaussian"``,
    ``"pissa"`` (A and B from the weight's top singular vectors; the base keeps the residual) or
    ``"pissa_niter_<n>"`` (the same with a fast randomized SVD). ``rank_pattern`` /
    ``alpha_pattern``: per-module ``r`` / ``lora_alpha`` by module name suffix or regex.
    ``ensure_weight_tying``: with input embeddings tied to the output head, the ``modules_to_save`` copies of
    the two share one weight, as the base model's do (otherwise each trains its own copy).
    """

    PEFT_TYPE: ClassVar[str] = "LORA"
    IGNORED_FIELDS: ClassVar[dict[str, Any]] = {
        **LayerConfig.IGNORED_FIELDS, "megatron_core": "megatron.core", "qalora_group_size": _ANY,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    ensure_weight_tying: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer (the rank), not {self.r!r}.")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, not {rank!r}.")
        check_finite("LoraConfig", "lora_alpha", self.lora_alpha)
        for key, alpha in self.alpha_pattern.items():
            check_finite("LoraConfig", f"alpha_pattern[{key!r}]", alpha)
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                check_regex(f"The LoraConfig.{name} key", key, used_as=NAME_SUFFIX)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), not {self.lora_dropout!r}.")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {BIAS_CHOICES}, not {self.bias!r}.")
        if self.init_lora_weights not in INIT_CHOICES and not pissa_iterations(self.init_lora_weights):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False, "
                f"'gaussian', 'pissa' or 'pissa_niter_<n>'."
            )

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)


def pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first key that matches the end of ``module_name`` (a suffix or a regex), as in HF PEFT.
    Keys come from strangers' files, so they are matched in bounded time (:mod:`peft_core.patterns`)."""
    for key, value in pattern.items():
        if compile_pattern(key, "LoraConfig pattern key", used_as=NAME_SUFFIX).fullmatch(module_name):
            return value
    return default


def pissa_iterations(init: object) -> int | None:
    """``n`` for ``"pissa_niter_<n>"``, else None."""
    found = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
    return int(found.group(1)) if found else None
