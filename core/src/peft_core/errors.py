"""The one exception hierarchy of the library. Every message says what went wrong and what to do."""

from __future__ import annotations


class PeftError(Exception):
    """Base class of every error raised by peft-core and its plugins."""


class ConfigError(PeftError, ValueError):
    """A method config has an invalid value, or does not fit the model it is applied to."""


class PluginError(PeftError):
    """A plugin is missing, broken, or conflicts with another one."""


class AdapterLoadError(PeftError):
    """A saved adapter cannot be loaded: missing or corrupt files, or weights that do not fit the model."""
