"""Prefix tuning passes the conformance suite every method plugin runs (BERT takes no key/value cache)."""

from __future__ import annotations

from peft_core.testing.conformance import TASK_TYPES, MethodConformance
from peft_prefix_tuning import PrefixTuningConfig


class TestPrefixTuning(MethodConformance):
    models = ("llama", "gpt2")

    def config(self, kind):
        return PrefixTuningConfig(num_virtual_tokens=4, task_type=TASK_TYPES[kind])

    bad_configs = [
        (lambda: PrefixTuningConfig(num_virtual_tokens=0), "num_virtual_tokens, a positive integer"),
        (lambda: PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=5),
         "does not split into"),
    ]
