"""``QLoraConfig``: the LoRA fields plus how to quantize the base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peft_core.errors import ConfigError
from peft_lora.config import LoraConfig

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA on a quantized base. ``get_peft_model(model, QLoraConfig(...))`` quantizes, then injects.

    ``bits``: 4 (``bitsandbytes`` ``Linear4bit``) or 8 (``Linear8bitLt``). ``quant_type``: ``"nf4"``
    or ``"fp4"`` (4-bit only). ``double_quant``: quantize the 4-bit block scales too. ``compute_dtype``:
    the dtype 4-bit layers compute in (``None``: the dtype of the model's weights). ``skip_modules``:
    Linear layers (names or suffixes) kept in full precision; the output head always is.

    What is saved is an ordinary LoRA adapter (``peft_type`` ``"LORA"``, no quantization fields): it
    loads on a quantized or a full-precision base, in this library or Hugging Face PEFT.
    """

    QUANTIZATION_FIELDS: ClassVar[tuple[str, ...]] = (
        "bits", "quant_type", "double_quant", "compute_dtype", "skip_modules",
    )

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None
    skip_modules: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        if self.bits not in (4, 8):
            raise ConfigError(f"QLoraConfig.bits must be 4 or 8 (bitsandbytes' layers), not {self.bits!r}.")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quant_type must be 'nf4' or 'fp4', not {self.quant_type!r}.")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise ConfigError(f"compute_dtype must be one of {DTYPES} or None, not {self.compute_dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in self.QUANTIZATION_FIELDS:  # they describe the base, not the adapter
            del data[name]
        return data
