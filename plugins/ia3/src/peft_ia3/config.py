"""``IA3Config``: the fields and meanings Hugging Face PEFT users know."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peft_core.config import LayerConfig, check_regex
from peft_core.errors import ConfigError


@dataclass
class IA3Config(LayerConfig):
    """(IA)^3: each target layer learns a vector ``l`` that scales its output, ``l * (W x + b)``; for the
    layers named in ``feedforward_modules`` it scales the input instead, ``W (l * x) + b``.

    ``feedforward_modules`` takes the forms of ``target_modules`` (list of suffixes or a regex) and must
    name a subset of the targets. ``init_ia3_weights=True`` starts every ``l`` at one, so the model starts
    unchanged; ``False`` draws them at random.
    """

    PEFT_TYPE: ClassVar[str] = "IA3"
    # Keys, values and the feed-forward output by default, the feed-forward ones from the "feedforward" role
    # (peft_ia3.targets, added to the core's table by the plugin).
    DEFAULT_TARGETS_ROLE: ClassVar[str] = "ia3"

    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        super().validate()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(feedforward, str):
            check_regex("IA3Config.feedforward_modules", feedforward)
        if isinstance(targets, list) and isinstance(feedforward, list):
            outside = [m for m in feedforward if m not in targets]
            if outside:
                raise ConfigError(
                    f"feedforward_modules must be a subset of target_modules; {outside} are not targets. "
                    f"Add them to target_modules or remove them from feedforward_modules."
                )

    def feedforward_for(self, model: Any) -> list[str] | str:
        """The feed-forward modules, defaulting with the targets when neither was given."""
        if self.feedforward_modules is not None:
            return self.feedforward_modules
        if self.target_modules is None:
            from peft_core.targets import default_targets

            return default_targets(model, "feedforward", "IA3Config.feedforward_modules")
        return []
