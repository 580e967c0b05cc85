"""QLoRA for peft-core: LoRA on a base whose Linear layers bitsandbytes quantized to 4 or 8 bits."""

from peft_qlora.config import QLoraConfig

__all__ = ["QLoraConfig", "dequantize_model", "prepare_model_for_kbit_training", "quantize_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The functions need torch and bitsandbytes; importing the package for its config does not.
    if name in ("quantize_model", "dequantize_model"):
        from peft_qlora import layer

        return getattr(layer, name)
    if name == "prepare_model_for_kbit_training":
        from peft_qlora.training import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training
    raise AttributeError(f"module 'peft_qlora' has no attribute {name!r}")
