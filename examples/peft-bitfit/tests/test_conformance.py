"""BitFit passes the conformance suite every method plugin runs, with its default targets on each model.

On Llama every target lacks a bias, so there the suite also checks the added biases: trained, saved,
merged into a bias the merge creates, and gone again after unmerging.
"""

from __future__ import annotations

from peft_bitfit import BitFitConfig
from peft_core.testing.conformance import TASK_TYPES, MethodConformance


class TestBitFit(MethodConformance):
    models = ("llama", "gpt2", "bert-classifier")

    def config(self, kind: str) -> BitFitConfig:
        return BitFitConfig(task_type=TASK_TYPES[kind])  # the "bitfit" default targets of the family

    bad_configs = [
        (lambda: BitFitConfig(missing_bias="sometimes"), "missing_bias must be one of 'add', 'skip', 'error'"),
        (lambda: BitFitConfig(target_modules=5), "target_modules must be a list"),
        (lambda: BitFitConfig(target_modules=["no_such_layer"]), "matched no module"),
    ]
