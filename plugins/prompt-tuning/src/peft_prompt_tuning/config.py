"""``PromptTuningConfig``: the fields and meanings Hugging Face PEFT users know."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peft_core.config import PromptLearningConfig
from peft_core.errors import ConfigError

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trained embeddings put before the input embeddings.

    ``prompt_tuning_init`` starts them at random (``"RANDOM"``), as the embeddings of tokens sampled from
    the vocabulary (``"SAMPLE_VOCAB"``), or as the embeddings of ``prompt_tuning_init_text``, tokenized
    by the tokenizer at ``tokenizer_name_or_path`` (a local directory or a Hub id) and repeated or cut to
    length (``"TEXT"``). ``tokenizer_kwargs`` go to ``AutoTokenizer.from_pretrained``.
    """

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in INITS:
            raise ConfigError(f"prompt_tuning_init={self.prompt_tuning_init!r} is not one of {', '.join(INITS)}.")
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ConfigError(
                    "prompt_tuning_init='TEXT' tokenizes prompt_tuning_init_text and needs a tokenizer: set "
                    "tokenizer_name_or_path (a local directory or a Hub id)."
                )
            if not self.prompt_tuning_init_text:
                raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from.")
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs only apply with prompt_tuning_init='TEXT'.")
        if (self.tokenizer_kwargs or {}).get("trust_remote_code"):
            raise ConfigError("tokenizer_kwargs may not set trust_remote_code: loading an adapter never runs code.")
