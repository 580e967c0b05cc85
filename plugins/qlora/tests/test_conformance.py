"""QLoRA passes the conformance suite every method plugin runs (on a 4-bit base, on the CPU)."""

from __future__ import annotations

from peft_core.model import TASK_MODELS, PeftModel, prepare_config
from peft_core.testing.conformance import ATTENTION_TARGETS, TASK_TYPES, MethodConformance
from peft_qlora import QLoraConfig
from peft_qlora.layer import quantize_model


class TestQLora(MethodConformance):
    # Quantizing needs the weights: on the meta device the plugin must refuse clearly.
    meta_device = False
    # Merging into 4-bit weights re-quantizes them.
    merge_tolerance = 0.1

    def loading_base(self, kind, tiny_model_dir):
        # A QLoRA adapter is saved as plain LoRA; it computes what it trained with on the same 4-bit base.
        base = self.base(kind, tiny_model_dir)
        config = self.config(kind)
        prepare_config(base, config, TASK_MODELS.get(config.task_type, PeftModel))
        return quantize_model(base, config)

    def config(self, kind):
        return QLoraConfig(bits=4, r=4, lora_alpha=8, target_modules=ATTENTION_TARGETS[kind],
                           task_type=TASK_TYPES[kind])

    bad_configs = [
        (lambda: QLoraConfig(bits=3), "bits must be 4 or 8"),
        (lambda: QLoraConfig(r=0), "r must be a positive integer"),
    ]
