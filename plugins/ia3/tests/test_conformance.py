"""IA3 passes the conformance suite every method plugin runs."""

from __future__ import annotations

from peft_core.testing.conformance import TASK_TYPES, MethodConformance
from peft_ia3 import IA3Config

TARGETS = {  # (targets, feed-forward targets) by tiny model
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert-classifier": (["key", "value", "output.dense"], ["output.dense"]),
}


class TestIA3(MethodConformance):
    def config(self, kind):
        targets, feedforward = TARGETS[kind]
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=TASK_TYPES[kind])

    bad_configs = [
        (lambda: IA3Config(target_modules=["q_proj"], feedforward_modules=["k_proj"]), "must be a subset"),
        (lambda: IA3Config(target_modules=5), "target_modules must be a list"),
    ]
