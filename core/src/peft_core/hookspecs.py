"""The contract between peft-core and method plugins.

Every hook is named ``peft_<what>`` and is called with keyword arguments, so a plugin implements only
the arguments it needs and specs can grow without breaking plugins. Hooks run at lifecycle moments
(discovery, injection, once per model call, merge, save/load, quantization), never inside a layer's
forward: a layer's forward is a plain ``nn.Module.forward`` of the modules the plugin injected.

Hooks marked *first result* stop at the first implementation that returns something other than
``None``; a plugin returns ``None`` for configs that are not its own. peft-core registers defaults for
layer methods (see :mod:`peft_core.defaults`) that run last, so a layer method usually implements
only :func:`peft_register_methods` and :func:`peft_inject`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peft_core.config import PeftConfig
    from peft_core.plugins import AdapterFormat, LayerType, Method

hookspec = pluggy.HookspecMarker("peft_core")


# --- discovery -------------------------------------------------------------------------------


@hookspec
def peft_register_methods(register: Callable[[Method], None]) -> None:
    """Declare the methods this plugin provides.

    Called once, when plugins are loaded. Call ``register(Method(name=..., peft_type=...,
    config_class=...))`` for each method. A ``name`` or ``peft_type`` that another plugin already
    registered is refused with :class:`~peft_core.errors.PluginError`.
    """


@hookspec
def peft_default_targets(register: Callable[[str, str, list[str]], None]) -> None:
    """Add default target modules for model families, or for a role of your own method.

    Called each time a config with ``target_modules=None`` is injected. Call
    ``register(family, role, module_names)``: ``family`` is a transformers ``model_type`` or a model class
    name, ``role`` the ``DEFAULT_TARGETS_ROLE`` of the configs that read it (``"attention"`` for LoRA,
    ``"ia3"`` and ``"feedforward"`` for IA3, or your method's). Entries replace the built-in ones of
    :mod:`peft_core.targets` for the same family and role.
    """


@hookspec
def peft_register_layer_types(register: Callable[[LayerType], None]) -> None:
    """Teach the core a layer class that is neither torch's nor transformers' (a quantized Linear).

    Called once, when plugins are loaded. Call ``register(LayerType(qualified_name, ...))`` for each class:
    whether ``target_modules="all-linear"`` targets it, how its weight is read and written as a dense tensor
    (merging, DoRA and PiSSA go through these), and how many elements its packed weight stands for
    (trainable-parameter counts). A class another plugin registered is refused.
    """


@hookspec
def peft_register_formats(register: Callable[[AdapterFormat], None]) -> None:
    """Provide a foreign adapter format, such as diffusers' LoRA files.

    Called once, when plugins are loaded. Call ``register(AdapterFormat(name=..., ...))``: ``peft convert
    --to NAME`` then writes a saved adapter in that format and ``--from NAME`` reads one, for whichever
    method the plugin supports. A name another plugin registered is refused.
    """


@hookspec
def peft_register_commands(register: Callable[[str, Callable[[Any], Any]], None]) -> None:
    """Add subcommands to the ``peft`` command.

    Called when the command starts. Call ``register(name, add_parser)``; ``add_parser(subparsers)`` adds an
    ``argparse`` parser named ``name`` to ``subparsers`` and sets its default ``run(args) -> int``. Errors a
    subcommand raises become one line on stderr, as for the core's own commands. A name already taken is
    refused.
    """


# --- building a model ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def peft_quantize(model: nn.Module, config: PeftConfig) -> nn.Module | None:
    """Replace the base model's layers by quantized ones before any adapter is injected.

    Called by ``get_peft_model`` and ``PeftModel.from_pretrained`` once per new adapter, before
    :func:`peft_inject`. Receives the base model (possibly already quantized: then quantize nothing)
    and the adapter's config. Returns the model (the same object, changed in place) if this plugin
    quantized it or found it already quantized as asked, ``None`` if the config asks for no
    quantization this plugin provides.
    """


@hookspec(firstresult=True)
def peft_inject(model: nn.Module, config: PeftConfig, adapter_name: str) -> list[str] | None:
    """Put the method's modules for one adapter into the model.

    Called once per adapter by ``get_peft_model``, ``add_adapter`` and ``load_adapter``. Receives
    the base model (already carrying other adapters, maybe of other methods), the adapter's config
    and its name. A layer method usually calls :func:`peft_core.inject.inject_adapters` with its table
    of adapter classes by layer type. Returns the qualified names of the modules it adapted, or
    ``None`` if the config is not this plugin's.
    """


@hookspec(firstresult=True)
def peft_forward(
    model: nn.Module, config: PeftConfig, adapter_name: str, inputs: dict[str, Any], continuation: bool
) -> dict[str, Any] | None:
    """Rewrite the keyword inputs of one call of the base model for one active adapter (soft prompts).

    Called for each active adapter whose :class:`~peft_core.plugins.Method` declares
    ``transforms_inputs=True``, in the order of the active adapters; never for layer methods. Called by
    ``PeftModel.forward`` and, during ``generate``, for every call generation makes of the model (for an
    encoder-decoder model, also once with the encoder's inputs before generation starts).
    ``continuation`` is True when the call continues from a key/value cache that already holds what
    the adapters added on the first call (then only masks and positions should move). Returns the new
    inputs, or ``None`` if the adapter is not this plugin's. peft-core's default handles every
    :class:`~peft_core.soft_prompt.SoftPrompt` a plugin attached.
    """


@hookspec
def peft_loss(model: nn.Module, config: PeftConfig, adapter_name: str, outputs: Any) -> torch.Tensor | None:
    """A term to add to the training loss, such as a regulariser of the adapter's weights.

    Called by ``PeftModel.forward`` in training mode, once per call, for each active trainable adapter whose
    :class:`~peft_core.plugins.Method` declares ``adds_loss=True``, when the model's outputs carry a
    ``loss``. Receives those outputs. Returns a scalar tensor, added to ``outputs.loss``, or ``None``.
    """


@hookspec
def peft_optimizer_step(model: nn.Module, config: PeftConfig, adapter_name: str, step: int) -> None:
    """React to an optimizer step of ``peft train`` (peft-train calls it from the Trainer callback
    ``peft_train.MethodSteps``, which any ``PeftTrainer`` can add).

    Called after each ``optimizer.step()``, before gradients are zeroed, once per active adapter, with the
    0-based index of the step. For methods whose training needs more than the optimizer (AdaLoRA's rank
    allocator). Return nothing; implementations ignore configs that are not theirs. Loops written by users
    call the method's own API instead (AdaLoRA: ``update_and_allocate`` or ``install_allocator``).
    """


@hookspec
def peft_delete(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """An adapter is being deleted or unloaded: remove what the plugin installed for it besides the modules
    it injected (hooks, allocators, buffers shared across layers), so nothing of it is left behind.

    Called by ``delete_adapter``, ``unload`` and ``merge_and_unload``, before the core takes the adapter's
    modules out, for every plugin; implementations ignore configs that are not theirs. Returns nothing.
    """


# --- merging ----------------------------------------------------------------------------------


@hookspec(firstresult=True)
def peft_merge(model: nn.Module, config: PeftConfig, adapter_name: str, safe_merge: bool) -> bool | None:
    """Fold one adapter into the base weights.

    Called by ``merge_adapter`` and ``merge_and_unload``. With ``safe_merge`` the merged weights
    are checked for NaN/Inf before the base is changed. Returns ``True`` when merged, ``None`` to
    leave it to the next implementation. peft-core's default merges every adapter layer's
    ``merged_weight``; raise :class:`~peft_core.errors.PeftError` for a method that cannot merge.
    """


@hookspec(firstresult=True)
def peft_unmerge(model: nn.Module, config: PeftConfig, adapter_name: str) -> bool | None:
    """Undo :func:`peft_merge` for one adapter, restoring the base weights to float tolerance.

    Called by ``unmerge_adapter`` and ``unload``. Returns ``True`` when done, ``None`` to leave it to
    the next implementation.
    """


@hookspec(firstresult=True)
def peft_add_weighted_adapter(
    peft_model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str,
    options: dict[str, Any],
) -> bool | None:
    """Add ``adapter_name``, an adapter combining the existing ``adapters`` with ``weights``.

    Called by ``PeftModel.add_weighted_adapter`` when every adapter in ``adapters`` is of one method.
    Receives the :class:`~peft_core.model.PeftModel` itself (the plugin adds the new adapter with
    ``peft_model.add_adapter`` and then writes its weights), the ``combination_type`` (LoRA: ``"linear"``,
    ``"cat"``, ``"svd"``, ``"ties"``, ...) and the remaining keyword ``options`` of the call. Returns
    ``True`` when done, ``None`` if the adapters are not this plugin's; raises
    :class:`~peft_core.errors.ConfigError` for a combination it does not support.
    """


# --- saving and loading -----------------------------------------------------------------------


@hookspec(firstresult=True)
def peft_state_dict(
    model: nn.Module, config: PeftConfig, adapter_name: str, for_saving: bool
) -> dict[str, torch.Tensor] | None:
    """Map the adapter's saved keys to its live tensors.

    Called by ``save_pretrained`` (the tensors are written under these keys, ``for_saving=True``),
    by ``from_pretrained`` / ``load_adapter`` (loaded tensors are copied into them) and whenever the
    active adapters change (exactly these tensors train), so one mapping serves all three. Keys are in
    the Hugging Face PEFT format: ``base_model.model.<module path>.<parameter>`` without the adapter
    name. Values must be the live tensors, except with ``for_saving``, when a method may return what
    the file should hold instead (AdaLoRA: only the ranks it kept). A value that is a tensor of the base
    model itself (a bias the method trains) declares that the adapter may change it: a saved file may
    then hold it, and its original is kept and written back when the adapter is deleted or unloaded; a
    file's keys for undeclared base tensors are refused. Returns the mapping, or ``None`` to leave it to
    the next implementation (peft-core's default covers adapter layers and ``modules_to_save``).
    """


# --- describing -------------------------------------------------------------------------------


@hookspec(firstresult=True)
def peft_describe(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Facts about a saved adapter that only its method knows, for ``peft inspect`` (LoRA: the ranks its
    factors really have).

    Called by ``peft inspect`` for each adapter it describes. Receives the adapter's ``adapter_config.json``
    as a dict and its tensors, without a model. Returns a JSON-ready dict of extra fields, or ``None`` if the
    adapter is not this plugin's.
    """
