"""LoRA passes the conformance suite every method plugin runs."""

from __future__ import annotations

from peft_core.testing.conformance import ATTENTION_TARGETS, TASK_TYPES, MethodConformance
from peft_lora import LoraConfig


class TestLora(MethodConformance):
    def config(self, kind):
        return LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION_TARGETS[kind], task_type=TASK_TYPES[kind])

    bad_configs = [
        (lambda: LoraConfig(r=0), "r must be a positive integer"),
        (lambda: LoraConfig(lora_dropout=2), r"lora_dropout must be in \[0, 1\)"),
        (lambda: LoraConfig(target_modules=5), "target_modules must be a list"),
        (lambda: LoraConfig(target_modules=["no_such_layer"]), "no_such_layer"),
    ]
