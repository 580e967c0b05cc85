"""The plugin manager: loads the ``peft_core`` entry points once and keeps the registry of methods.

It is the only global state of the library. Nothing here imports torch or a plugin by name: a plugin is
found through its entry point, and the methods it provides through its ``peft_register_methods`` hook.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from peft_core import hookspecs
from peft_core.errors import PluginError

if TYPE_CHECKING:
    from peft_core.config import PeftConfig

ENTRY_POINT_GROUP = "peft_core"
# The version of the plugin API (the hooks of peft_core.hookspecs and the classes they pass). A plugin
# declares the version it was written for as a module attribute ``PEFT_CORE_API``; another is refused.
API_VERSION = 1
hookimpl = pluggy.HookimplMarker("peft_core")


@dataclass(frozen=True)
class Method:
    """A fine-tuning method a plugin provides.

    ``peft_type`` is the string written to and read from ``adapter_config.json``; ``package`` and
    ``version`` name the distribution that registered it (filled in by the manager).
    ``transforms_inputs`` marks methods that act on the model's inputs through ``peft_forward``
    (soft prompts) rather than on its layers. ``merges=False`` marks methods whose adapters cannot be
    folded into the base weights (soft prompts): ``merge_and_unload`` refuses to drop them silently.
    ``loads_adapters=False`` marks a method whose saved adapters are another method's (QLoRA saves plain
    LoRA adapters): it is never chosen to read a file. ``adds_loss=True`` marks a method whose training
    adds a term to the loss through ``peft_loss`` (AdaLoRA's orthogonality penalty). ``tensor_prefixes``
    declares how the names of its adapters' saved tensors begin, after the adapted layer's path
    (``("lora_",)`` for ``...q_proj.lora_A.weight``): ``peft inspect`` then tells them from the base-model
    tensors a file replaces (``None``: not declared). ``broken`` is the reason a plugin was refused, for
    the entries :func:`methods` lists for refused plugins (their other fields are then unknown).
    """

    name: str
    peft_type: str
    config_class: type[PeftConfig] | None
    transforms_inputs: bool = False
    merges: bool = True
    loads_adapters: bool = True
    adds_loss: bool = False
    tensor_prefixes: tuple[str, ...] | None = None
    package: str | None = None
    version: str | None = None
    broken: str | None = None


@dataclass(frozen=True)
class LayerType:
    """A layer class the core does not know by itself, registered through ``peft_register_layer_types``.

    ``qualified_name`` is the class's module and name (``"bitsandbytes.nn.modules.Linear4bit"``); subclasses
    match it unless registered themselves. ``linear_like``: ``target_modules="all-linear"`` targets it.
    ``read_weight(layer)`` gives its weight as a dense tensor in the stored layout and ``write_weight(layer,
    weight)`` stores one; a lossy write (re-quantizing) must give the layer a new weight parameter, so that an
    unmerge restores the old one exactly. Both None: the layer's ``weight`` is a plain tensor.
    ``weight_elements(layer)``: how many elements a packed weight stands for, in trainable-parameter counts.
    """

    qualified_name: str
    linear_like: bool = True
    read_weight: Callable[[Any], Any] | None = None
    write_weight: Callable[[Any, Any], None] | None = None
    weight_elements: Callable[[Any], int] | None = None
    package: str | None = None


@dataclass(frozen=True)
class AdapterFormat:
    """A foreign adapter format, registered through ``peft_register_formats``.

    ``export(saved, destination, options) -> path`` writes a saved adapter (a
    :class:`~peft_core.serialization.SavedAdapter`, read and checked as the loader reads it) in this format;
    ``import_(source, destination, options) -> path`` saves a file of this format as an adapter in Hugging
    Face PEFT's format. Each checks what it writes as the loader would. ``options`` holds ``force`` (overwrite
    what is at the destination) and the settings ``add_arguments(group)`` adds to ``peft convert``, by name.
    """

    name: str
    description: str
    export: Callable[..., str]
    import_: Callable[..., str]
    add_arguments: Callable[[Any], None] | None = None
    package: str | None = None


def package_for_peft_type(peft_type: str) -> str:
    """The distribution that, by the naming convention of this project, provides ``peft_type``."""
    return "peft-" + peft_type.lower().replace("_", "-")


class PluginRegistry:
    """A pluggy manager plus the methods its plugins registered, built once per process."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager("peft_core")
        self.manager.add_hookspecs(hookspecs)
        self.methods: dict[str, Method] = {}
        self.layer_types: dict[str, LayerType] = {}
        self.formats: dict[str, AdapterFormat] = {}
        self._registered_by: dict[str, tuple[list[str], list[str], list[str]]] = {}  # plugin -> its table keys
        self.broken: dict[str, str] = {}  # plugin name -> why it was refused
        self.refused: list[Method] = []  # an entry per refused plugin, for methods()
        from peft_core import cli, defaults

        self.manager.register(defaults, name="peft_core.defaults")
        self.manager.register(cli, name="peft_core.cli")  # the peft command's own subcommands

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def load_entry_points(self) -> None:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist
            package = dist.metadata["Name"] if dist is not None else entry_point.value
            version = dist.version if dist is not None else None
            name = f"{package}:{entry_point.name}"
            if self.manager.has_plugin(name) or self.manager.is_blocked(name):
                continue
            try:
                plugin = entry_point.load()
                self.register(plugin, name=name, package=package, version=version)
            except Exception as exc:  # one broken plugin must not stop the others
                reason = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
                self.broken[name] = reason
                self.refused.append(Method(
                    name=entry_point.name, peft_type="", config_class=None, package=package, version=version,
                    broken=reason,
                ))

    def register(
        self, plugin: ModuleType | object, name: str | None = None, package: str | None = None,
        version: str | None = None,
    ) -> None:
        """Register a plugin object (a module or instance with ``@hookimpl`` functions).

        Raises :class:`PluginError` if it implements a hook that does not exist or registers a method
        name or ``peft_type`` that is already taken; the plugin is then left unregistered.
        """
        label = package or name or getattr(plugin, "__name__", repr(plugin))
        try:
            name = self.manager.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"Plugin {label} is invalid: {exc}") from exc
        try:
            self._check_api_version(plugin, label)
            self._check_hooks(plugin, label)
            new_methods = self._collect_methods(plugin, label, package, version)
            new_layer_types = self._collect(plugin, "peft_register_layer_types", "qualified_name", label, package)
            new_formats = self._collect(plugin, "peft_register_formats", "name", label, package)
        except Exception:
            self.manager.unregister(name=name)
            raise
        self.methods.update(new_methods)
        self.layer_types.update(new_layer_types)
        self.formats.update(new_formats)
        self._registered_by[name] = (list(new_methods), list(new_layer_types), list(new_formats))

    def unregister(self, name: str) -> None:
        """Remove the plugin registered under ``name`` and what it registered (methods, layer types, formats)."""
        self.manager.unregister(name=name)
        methods, layer_types, formats = self._registered_by.pop(name, ([], [], []))
        for table, keys in ((self.methods, methods), (self.layer_types, layer_types), (self.formats, formats)):
            for key in keys:
                table.pop(key, None)

    def _check_api_version(self, plugin: object, label: str) -> None:
        declared = getattr(plugin, "PEFT_CORE_API", API_VERSION)
        if declared != API_VERSION:
            raise PluginError(
                f"Plugin {label} is written for version {declared!r} of peft-core's plugin API; this peft-core "
                f"provides version {API_VERSION}. Install a release of {label} for API {API_VERSION}, or the "
                f"peft-core release it was written for."
            )

    def _check_hooks(self, plugin: object, label: str) -> None:
        for hook_caller in self.manager.get_hookcallers(plugin) or []:
            if not hook_caller.has_spec():
                raise PluginError(
                    f"Plugin {label} implements the hook '{hook_caller.name}', which peft-core does not "
                    f"define. Check its spelling against peft_core.hookspecs, or upgrade peft-core."
                )

    def _collect_methods(
        self, plugin: object, label: str, package: str | None, version: str | None
    ) -> dict[str, Method]:
        found: dict[str, Method] = {}

        def register_method(method: Method) -> None:
            method = replace(method, package=package or method.package, version=version or method.version)
            for taken in (*self.methods.values(), *found.values()):
                same_type = method.peft_type == taken.peft_type and method.loads_adapters and taken.loads_adapters
                if method.name == taken.name or same_type:
                    raise PluginError(
                        f"Plugin {label} registers method '{method.name}' (peft_type "
                        f"'{method.peft_type}'), but {taken.package or 'user code'} already registered "
                        f"'{taken.name}' (peft_type '{taken.peft_type}'). Uninstall one of the two."
                    )
            found[method.name] = method

        for impl in self.manager.hook.peft_register_methods.get_hookimpls():
            if impl.plugin is plugin:
                impl.function(**{arg: register_method for arg in impl.argnames})
        return found

    def _collect(self, plugin: object, hook: str, key: str, label: str, package: str | None) -> dict[str, Any]:
        """What ``plugin``'s registration hook ``hook`` registers, keyed by each entry's ``key`` field; a key
        another plugin (or this one) took already is refused."""
        taken = {"peft_register_layer_types": self.layer_types, "peft_register_formats": self.formats}[hook]
        found: dict[str, Any] = {}

        def register_entry(entry: Any) -> None:
            name = getattr(entry, key)
            if name in taken or name in found:
                other = taken[name].package if name in taken else label
                raise PluginError(f"Plugin {label} registers {name!r} through {hook}, which {other or 'user code'} "
                                  f"registered already. Uninstall one of the two.")
            found[name] = replace(entry, package=package or entry.package)

        for impl in getattr(self.manager.hook, hook).get_hookimpls():
            if impl.plugin is plugin:
                impl.function(**{arg: register_entry for arg in impl.argnames})
        return found

    def layer_type(self, qualified_names: Iterable[str]) -> LayerType | None:
        """The registered entry of the first of these class names (a layer's class, then its bases)."""
        return next((self.layer_types[n] for n in qualified_names if n in self.layer_types), None)

    def commands(self) -> dict[str, Callable[[Any], Any]]:
        """Subcommand name -> ``add_parser`` of every plugin's ``peft_register_commands``, the core's first."""
        found: dict[str, Callable[[Any], Any]] = {}

        def register_command(name: str, add_parser: Callable[[Any], Any]) -> None:
            if name in found:
                raise PluginError(f"Two plugins add the subcommand 'peft {name}'. Uninstall one of the two.")
            found[name] = add_parser

        self.hook.peft_register_commands(register=register_command)
        return found

    def first_answer(self, hook: str, **kwargs: Any) -> tuple[pluggy.HookImpl | None, Any]:
        """Call ``hook``'s implementations in pluggy's order until one answers (not None), as a first-result
        hook does; return that implementation too (``impl.function``, ``impl.argnames``), so a caller can call
        it directly from then on instead of dispatching through pluggy on every model call."""
        for impl in reversed(getattr(self.manager.hook, hook).get_hookimpls()):
            answer = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            if answer is not None:
                return impl, answer
        return None, None

    def method_for_config(self, config: PeftConfig) -> Method:
        # The most derived registered class wins, so a subclass method (QLoRA of LoRA) is found.
        for cls in type(config).__mro__:
            for method in self.methods.values():
                if method.config_class is cls:
                    return method
        raise PluginError(
            f"No installed plugin provides {type(config).__name__}. Register its plugin with "
            f"peft_core.register_plugin(...) or install the package that provides it."
        )

    def method_for_peft_type(self, peft_type: str) -> Method:
        for method in self.methods.values():
            if method.peft_type == peft_type and method.loads_adapters:
                return method
        hint = f" (it failed to load: {'; '.join(self.broken.values())})" if self.broken else ""
        raise PluginError(
            f"No installed plugin reads adapters of peft_type '{peft_type}'{hint}. Install its plugin: "
            f"pip install {package_for_peft_type(peft_type)}"
        )


_registry: PluginRegistry | None = None
_lock = threading.Lock()


def registry() -> PluginRegistry:
    """The process-wide registry, with entry points loaded on first use."""
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                fresh = PluginRegistry()
                fresh.load_entry_points()
                _registry = fresh
    return _registry


def reset_registry() -> None:
    """Forget loaded plugins, so the next use scans entry points again (for tests and notebooks)."""
    global _registry
    with _lock:
        _registry = None


def methods() -> list[Method]:
    """The methods of every installed and registered plugin, sorted by name, then an entry for each
    installed plugin that was refused (``broken`` says why)."""
    found = registry()
    return sorted(found.methods.values(), key=lambda m: m.name) + list(found.refused)


def broken_plugins() -> dict[str, str]:
    """Plugins that were found but refused, with the reason."""
    return dict(registry().broken)


def register_plugin(plugin: ModuleType | object, name: str | None = None) -> None:
    """Register a plugin defined in user code, without packaging it as an entry point."""
    registry().register(plugin, name=name)
