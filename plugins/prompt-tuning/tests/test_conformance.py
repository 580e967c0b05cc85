"""Prompt tuning passes the conformance suite every method plugin runs."""

from __future__ import annotations

from peft_core.testing.conformance import TASK_TYPES, MethodConformance
from peft_prompt_tuning import PromptTuningConfig


class TestPromptTuning(MethodConformance):
    learning_rate = 0.1  # a handful of embeddings: a larger step makes them matter after three steps

    def config(self, kind):
        return PromptTuningConfig(num_virtual_tokens=4, task_type=TASK_TYPES[kind])

    bad_configs = [
        (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens, a positive integer"),
        (lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"),
         "needs a tokenizer"),
    ]
