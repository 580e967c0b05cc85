"""P-tuning passes the conformance suite every method plugin runs."""

from __future__ import annotations

from peft_core.testing.conformance import TASK_TYPES, MethodConformance
from peft_p_tuning import PromptEncoderConfig


class TestPTuning(MethodConformance):
    def config(self, kind):
        return PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type=TASK_TYPES[kind])

    bad_configs = [
        (lambda: PromptEncoderConfig(num_virtual_tokens=-1), "num_virtual_tokens, a positive integer"),
        (lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU"), "not one of"),
    ]
