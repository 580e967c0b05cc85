"""AdaLoRA passes the conformance suite every method plugin runs."""

from __future__ import annotations

from peft_adalora import AdaLoraConfig
from peft_core.testing.conformance import ATTENTION_TARGETS, TASK_TYPES, MethodConformance


class TestAdaLora(MethodConformance):
    def config(self, kind):
        return AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=ATTENTION_TARGETS[kind],
                             task_type=TASK_TYPES[kind])

    bad_configs = [
        (lambda: AdaLoraConfig(total_step=None), "needs total_step"),
        (lambda: AdaLoraConfig(total_step=10, init_r=2, target_r=4), "larger than init_r"),
    ]
