"""Base classes of method configs: dataclasses with a JSON round trip in the Hugging Face PEFT format."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from peft_core.errors import ConfigError
from peft_core.field_types import check_field_types
from peft_core.patterns import compile_pattern

TASK_TYPES = (
    "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION",
)
CONFIG_NAME = "adapter_config.json"
_ANY = object()  # an ignored field whose every value is harmless


@dataclass
class PeftConfig:
    """What every adapter config has. Subclasses add their method's fields and set ``PEFT_TYPE``."""

    PEFT_TYPE: ClassVar[str] = ""
    # Fields that Hugging Face PEFT writes and this library has no use for, with the value at which
    # ignoring them changes nothing (or _ANY). Other unknown fields are ignored with a warning.
    IGNORED_FIELDS: ClassVar[dict[str, Any]] = {"auto_mapping": _ANY, "peft_version": _ANY}

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Type-check every field, then :meth:`validate` the values; run when the config is built and again
        when an adapter is added, since fields may have been set in between."""
        check_field_types(self)  # first, so validate() compares numbers with numbers
        self.validate()

    @property
    def peft_type(self) -> str:
        return self.PEFT_TYPE

    def validate(self) -> None:
        """Raise :class:`ConfigError` for invalid values. Subclasses extend it (and call super)."""
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type={self.task_type!r} is not one of {', '.join(TASK_TYPES)} (or None).")

    # --- JSON round trip ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = sorted(value) if isinstance(value, (set, frozenset)) else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        data = dict(data)
        peft_type = data.pop("peft_type", cls.PEFT_TYPE)
        if peft_type != cls.PEFT_TYPE:
            raise ConfigError(f"{cls.__name__} reads peft_type {cls.PEFT_TYPE!r}, not {peft_type!r}.")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = {k: data.pop(k) for k in list(data) if k not in known}
        surprising = [k for k, v in unknown.items() if not cls._is_ignorable(k, v)]
        if surprising:
            warnings.warn(
                f"{cls.__name__}: ignoring {', '.join(f'{k}={unknown[k]!r}' for k in surprising)}, which this "
                f"version does not support (the adapter may come from a newer library). Outputs may differ "
                f"from the library that wrote it; upgrade the plugin if a newer one supports it.",
                stacklevel=3,
            )
        return cls(**data)

    @classmethod
    def _is_ignorable(cls, key: str, value: Any) -> bool:
        expected = cls.IGNORED_FIELDS.get(key, None)
        return expected is _ANY or value == expected or value in (None, False, "", [], {})

    def to_json_string(self, **overrides: Any) -> str:
        """The ``adapter_config.json`` text, with ``overrides`` replacing fields."""
        return json.dumps({**self.to_dict(), **overrides}, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically)."""
        from peft_core.serialization import atomic_write_bytes

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), self.to_json_string().encode())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **hub_kwargs: Any) -> PeftConfig:
        """Read a config from a directory, a JSON file or a Hub repo; the class is chosen by ``peft_type``."""
        from peft_core.serialization import read_config, read_config_dict

        if not cls.PEFT_TYPE:
            return read_config(path, **hub_kwargs)  # errors name the file
        return cls.from_dict(read_config_dict(path, **hub_kwargs))


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """Build the config of whichever installed method reads ``data['peft_type']``."""
    from peft_core.plugins import registry

    if not isinstance(data, dict):
        raise ConfigError(f"An adapter config is a JSON object (a dict), not {type(data).__name__}.")
    if "peft_type" not in data:
        raise ConfigError("The adapter config has no 'peft_type'; it is not a PEFT adapter config.")
    if not isinstance(data["peft_type"], str):
        raise ConfigError(f"peft_type must be a string (the method's name in adapter files), not "
                          f"{data['peft_type']!r}.")
    method = registry().method_for_peft_type(data["peft_type"])
    return method.config_class.from_dict(data)


def check_regex(what: str, pattern: str, used_as: str = "{}") -> None:
    """Raise :class:`ConfigError` if ``pattern`` (``what``, e.g. ``LoraConfig.target_modules``), put in place
    of ``{}`` in ``used_as`` (the regex it becomes part of), is invalid or cannot be matched in bounded time
    (see :mod:`peft_core.patterns`), so a stranger's config is refused when it is read."""
    compile_pattern(pattern, what, used_as=used_as)


def check_finite(owner: str, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} must be a finite number, not {value!r}.")


@dataclass
class LayerConfig(PeftConfig):
    """Fields shared by methods that adapt individual layers (LoRA, IA3, AdaLoRA, ...).

    ``target_modules``: a list of module names or name suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``), a regular expression matched against the full name, or
    ``"all-linear"`` (every Linear-like layer but the output head). ``None`` picks the method's
    default for the model's family (see :mod:`peft_core.targets`). ``exclude_modules`` takes the same
    forms. ``layers_to_transform`` keeps only the layers with these indices in the stack named by ``layers_pattern``.
    ``modules_to_save`` are whole modules trained and saved in full with the adapter.
    """

    # Which column of the default-targets table (peft_core.targets) ``target_modules=None`` reads.
    DEFAULT_TARGETS_ROLE: ClassVar[str] = "attention"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "all-linear":
                check_regex(f"{owner}.{name}", value)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if any(index < 0 for index in self.layers_to_transform or []):
            raise ConfigError(
                f"{owner}.layers_to_transform takes block indices (>= 0), not {self.layers_to_transform}."
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only has an effect with layers_to_transform; set both.")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != "all-linear":
            raise ConfigError(
                "layers_to_transform cannot be combined with a regex target_modules; put the layer "
                "indices into the regex instead."
            )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by soft-prompt methods (prompt tuning, P-tuning, prefix tuning).

    ``num_virtual_tokens`` is how many virtual tokens the adapter puts in front of every input. The
    model-shape fields (``token_dim``, ``num_layers``, ``num_attention_heads``,
    ``num_transformer_submodules``) are filled in from the model when the adapter is created, and saved,
    so a saved adapter says what shape of model it fits. ``modules_to_save`` are whole modules trained
    and saved with the adapter (a classifier head).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) \
                or self.num_virtual_tokens <= 0:
            raise ConfigError(
                f"{type(self).__name__} needs num_virtual_tokens, a positive integer (how many virtual tokens "
                f"to put before the inputs); got {self.num_virtual_tokens!r}."
            )
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or None (filled from the model), not {value!r}.")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt table: an encoder-decoder model gets a block for each of its two stacks."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def complete_from(self, model: Any) -> None:
        """Fill the model-shape fields left as None from ``model.config`` (a transformers config), and
        refuse fields that do not fit the model, before the prompt is allocated."""
        from peft_core.allocation import check_allocation
        from peft_core.model_shape import check_token_inputs, max_positions, model_shape

        name = type(self).__name__
        check_token_inputs(model, name)
        shape = model_shape(model)
        for field_name, actual in (("token_dim", self.model_token_dim(shape)), ("num_layers", shape.num_layers)):
            saved = getattr(self, field_name)
            if saved is not None and saved != actual:
                raise ConfigError(
                    f"{name}.{field_name} is {saved}, but {type(model).__name__} has {actual}: the adapter was made "
                    f"for a model of another shape. Load it into the base model it was trained on."
                )
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == "SEQ_2_SEQ_LM" else 1
        self.num_layers = self.num_layers or shape.num_layers
        self.token_dim = self.token_dim or self.model_token_dim(shape)
        self.num_attention_heads = self.num_attention_heads or shape.num_attention_heads
        positions = max_positions(model)
        if positions is not None and self.num_virtual_tokens >= positions:
            raise ConfigError(
                f"{name}.num_virtual_tokens is {self.num_virtual_tokens}, but {type(model).__name__} takes at most "
                f"{positions} positions, which must hold the virtual tokens and the input. Use fewer virtual tokens."
            )
        check_allocation(self.parameter_count(), f"{name} with num_virtual_tokens={self.num_virtual_tokens}",
                         "lower num_virtual_tokens (or the encoder's size).")

    def model_token_dim(self, shape: Any) -> int:
        """The width of a virtual token for a model of this ``ModelShape``: its hidden size."""
        return shape.hidden_size

    def parameter_count(self) -> int:
        """How many values the prompt's weights hold (once ``complete_from`` filled the shape); methods
        with an encoder or per-layer prefixes override it."""
        return self.total_virtual_tokens * self.token_dim
