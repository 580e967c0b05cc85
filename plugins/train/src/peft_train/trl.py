"""TRL's ``SFTTrainer`` with peft-core models: adapter-only checkpoints, and TRL's fused LM head on the
wrapped model.

``SFTTrainer`` patches the forward of the model it trains with a fused LM head that computes per-token
log-probabilities from the backbone's hidden states. It recognises Hugging Face PEFT's wrappers only, so on
a :class:`~peft_core.model.PeftModel` it would patch the wrapper, whose ``base_model`` is no backbone.
:class:`PeftSFTTrainer` moves the patch to the wrapped transformers model, where it belongs.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from peft_train.trainer import PeftTrainerMixin

FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer's loss and metrics read


class PeftSFTTrainer(PeftTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` for a peft-core ``PeftModel``; checkpoints hold only the adapters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        peft_model = self._peft_model()
        if "forward" in vars(peft_model):  # SFTTrainer patched the wrapper: undo it, patch the wrapped model
            del peft_model.forward
            add_fused_lm_head(peft_model.get_base_model(), outputs=FUSED_OUTPUTS)
