"""``PeftModel``: a base model with adapters of any installed methods, and ``get_peft_model``.

The user-facing API follows Hugging Face PEFT: same method names, same meanings. The structure too:
``peft_model.base_model.model`` is the wrapped transformers model, so parameter names start with
``base_model.model.`` as in the saved files.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_core.base_tensors import BaseTensorClaims, base_tensors, changes_values, declared_base_tensors
from peft_core.config import PeftConfig
from peft_core.directory_commit import committed_path, staged_commit, write_files
from peft_core.errors import AdapterLoadError, PeftError, PluginError
from peft_core.layer import AdapterLayer, adapter_placement, getattr_through
from peft_core.mixed_batch import BASE, MixedBatch, current_mixed_batch, mixed_batch
from peft_core.modules_to_save import ModulesToSave
from peft_core.plugins import Method, registry
from peft_core.prompt_inputs import is_continuation, is_encoder_decoder
from peft_core.serialization import (
    SavedAdapter,
    adapter_files,
    check_fit,
    copy_values,
    read_adapter,
    reading,
    resolve_file,
)
from peft_core.soft_prompt import detach_soft_prompts, rewrite_mixed, soft_prompt
from peft_core.stacking import MANIFEST_NAME, Manifest, Stack, check_adapter_name, manifest_json, read_manifest
from peft_core.tied_embeddings import check_vocabulary, mark_shared_weights, record_untied_embeddings
from peft_core.walk import is_checkpointing, iter_modules, plain_name, qualified_names, replace_module

# The PeftModel whose generate() runs in this thread (and context), if any.
_generating: contextvars.ContextVar[PeftModel | None] = contextvars.ContextVar("peft_generating", default=None)
_hook_lock = threading.Lock()  # installs generate's pre-hook; not on the module, which must stay copyable


class AdaptedModel(nn.Module):
    """Holds the model whose layers carry adapters (``.model``); the root of saved key names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr_through(self, name, "model")


class PeftModel(nn.Module):
    """A model with one or more named adapters, of one or several methods.

    Build one with :func:`get_peft_model` or :meth:`from_pretrained`. Attributes the wrapper does not
    have are looked up on the wrapped model, so ``peft_model.config`` or ``peft_model.device`` work.
    """

    # Modules that task wrappers train and save in full with every adapter (a classification head).
    TASK_MODULES_TO_SAVE: tuple[str, ...] = ()

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig | Stack, adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        self.base_model = AdaptedModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        new = list(zip(peft_config.names, peft_config.members, strict=True)) if isinstance(peft_config, Stack) \
            else [(adapter_name, peft_config)]
        self.active_adapters: list[str] = [name for name, _ in new]  # active at once: add_adapter applies them
        self._methods: dict[str, Method] = {}
        self._merged: list[str] = []
        self._injected: dict[str, list[str]] = {}  # adapter -> the module names its plugin reported
        self._base_claims = BaseTensorClaims()  # base-model tensors adapters may change, with their originals
        # (hook, adapter) -> the plugin function that answers it, found once per change of adapters (_apply_state),
        # so that per-call hooks (peft_forward, peft_loss) do not go through pluggy on every model call.
        self._resolved: dict[tuple[str, str], Any] = {}
        self._disabled = False
        self._generation_hook: torch.utils.hooks.RemovableHandle | None = None
        model.requires_grad_(False)  # only what adapters add (and what they save) trains
        # The wrappers take the model's mode without changing any of its modules' (train() would).
        self.training = self.base_model.training = model.training
        for name, config in new:
            if isinstance(config, str):
                raise PeftError(f"A new model needs configs, not the adapter name {config!r}: pass a stack of "
                                f"method configs, stack([config, ...]).")
            self.add_adapter(name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        if is_checkpointing(model) and hasattr(model, "enable_input_require_grads"):
            # With the base frozen, checkpointed blocks would see inputs that need no grad and skip
            # the adapters' backward.
            model.enable_input_require_grads()

    def __getattr__(self, name: str) -> Any:
        return getattr_through(self, name, "base_model")  # and on through AdaptedModel to the model

    # --- the wrapped model -------------------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        """The transformers (or any torch) model, carrying the adapter layers."""
        return self.base_model.model

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the model with the active adapters, or with ``adapter_names[b]`` for sample ``b`` (a
        mixed batch; ``"__base__"`` for the base model alone)."""
        if args and (adapter_names is not None or self._transforming_adapters()):
            kwargs = {"input_ids": args[0], **kwargs}  # soft prompts rewrite inputs by name
            args = args[1:]
        mixed = self._mixed_batch(adapter_names, kwargs)
        with mixed_batch(mixed):
            outputs = self.base_model.model(*args, **self._transform_inputs(kwargs))
        if self.training and getattr(outputs, "loss", None) is not None:
            for name in self._loss_adapters():
                term = self._dispatch("peft_loss", name, outputs=outputs)
                if term is not None:
                    outputs.loss = outputs.loss + term
        return outputs

    def _loss_adapters(self) -> list[str]:
        return [n for n in self.active_adapters
                if self._methods[n].adds_loss and not self.peft_config[n].inference_mode]

    def _dispatch(self, hook: str, adapter_name: str, **inputs: Any) -> Any:
        """Call ``hook`` for one adapter: through pluggy the first time since its adapters changed, then straight
        to the plugin function that answered."""
        arguments = {"model": self.base_model.model, "config": self.peft_config[adapter_name],
                     "adapter_name": adapter_name, **inputs}
        impl = self._resolved.get((hook, adapter_name))
        if impl is None:
            impl, answer = registry().first_answer(hook, **arguments)
            if impl is not None:
                self._resolved[hook, adapter_name] = impl
            return answer
        return impl.function(**{arg: arguments[arg] for arg in impl.argnames})

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Generate with the active adapters, or per sample with ``adapter_names`` as in ``forward``; soft
        prompts join every model call generation makes."""
        model = self.base_model.model
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
            args = args[1:]
        mixed = self._mixed_batch(adapter_names, kwargs)
        with mixed_batch(mixed):
            if not self._transforming_adapters() and mixed is None:
                return model.generate(*args, **kwargs)
            if is_encoder_decoder(model):
                kwargs = self._transform_inputs(kwargs)  # the encoder runs once, on these inputs
            if self._generation_hook is None:
                with _hook_lock:  # threads whose first generate starts at once would each install one
                    if self._generation_hook is None:
                        self._generation_hook = model.register_forward_pre_hook(
                            self._rewrite_generation_call, with_kwargs=True
                        )
            token = _generating.set(self)
            try:
                return model.generate(*args, **kwargs)
            finally:
                _generating.reset(token)

    def _rewrite_generation_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # Installed once and left in place, so serving threads never add or remove hooks while others run
        # the model; it acts only inside this PeftModel's generate, in the thread that called it.
        if _generating.get() is not self:
            return None
        return args, self._transform_inputs(kwargs)

    def _mixed_batch(self, adapter_names: list[str] | None, inputs: dict[str, Any]) -> MixedBatch | None:
        if adapter_names is None:
            return None
        if isinstance(adapter_names, str):
            raise PeftError("adapter_names takes one adapter name per sample (a list), not one string.")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise PeftError(f"adapter_names: no adapter named {unknown}; this model has {sorted(self.peft_config)} "
                            f"(and {BASE!r} for the base model).")
        batch = next((inputs[k].shape[0] for k in ("input_ids", "inputs_embeds") if inputs.get(k) is not None), None)
        if batch is not None and batch != len(adapter_names):
            raise PeftError(f"adapter_names has {len(adapter_names)} names for a batch of {batch} samples.")
        if self.training:
            raise PeftError("adapter_names (a mixed batch) is for inference: call model.eval() first.")
        if self._merged:
            raise PeftError(f"adapter_names needs unmerged adapters; {self._merged} are merged: unmerge_adapter().")
        return MixedBatch.of(adapter_names)

    def _transforming_adapters(self) -> list[str]:
        if self._disabled:
            return []
        return [name for name in self.active_adapters if self._methods[name].transforms_inputs]

    def _transform_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        mixed = current_mixed_batch()
        if mixed is not None and not self._disabled:
            return self._transform_mixed(inputs, mixed)
        names = self._transforming_adapters()
        if not names:
            return inputs
        model = self.base_model.model
        continuation = is_continuation(model, inputs)  # decided once: the first adapter may fill the cache
        for name in names:
            rewritten = self._dispatch("peft_forward", name, inputs=inputs, continuation=continuation)
            if rewritten is None:
                method = self._methods[name]
                raise PluginError(
                    f"The {method.name} plugin ({method.package or 'user code'}) declares transforms_inputs "
                    f"but its peft_forward hook returned nothing for adapter {name!r}."
                )
            inputs = rewritten
        return inputs

    def _transform_mixed(self, inputs: dict[str, Any], mixed: MixedBatch) -> dict[str, Any]:
        model = self.base_model.model
        prompts = [soft_prompt(model, name) for name in mixed.names]
        unsupported = [n for n, p in zip(mixed.names, prompts, strict=True)
                       if p is None and self._methods[n].transforms_inputs]
        if unsupported:
            raise PeftError(f"Adapters {unsupported} act on inputs without a soft prompt; their method does not "
                            f"support mixed batches.")
        if not any(prompts):
            return inputs
        batch = next(inputs[k].shape[0] for k in ("input_ids", "inputs_embeds") if inputs.get(k) is not None)
        index = mixed.index_for(batch, model.get_input_embeddings().weight.device)
        return rewrite_mixed(model, inputs, prompts, index, is_continuation(model, inputs))

    # --- adapters ----------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """Inject a new, inactive adapter; ``set_adapter`` activates it.

        ``autocast_adapter_dtype`` (as in Hugging Face PEFT): True makes the layer adapters of float16 or
        bfloat16 layers float32; False gives them their layer's dtype. Soft prompts are float32 either way.
        """
        if adapter_name in self.peft_config:
            raise PeftError(f"An adapter named {adapter_name!r} exists already; delete it or pick another name.")
        check_adapter_name(adapter_name)
        method = registry().method_for_config(peft_config)
        peft_config.check()  # again: fields may have been set since the config was built
        prepare_config(self.base_model.model, peft_config, type(self))
        hook = registry().hook
        hook.peft_quantize(model=self.base_model.model, config=peft_config)
        injected = hook.peft_inject(model=self.base_model.model, config=peft_config, adapter_name=adapter_name)
        if injected is None:
            raise PluginError(
                f"The {method.name} plugin ({method.package or 'user code'}) registered "
                f"{type(peft_config).__name__} but injected nothing for it: its peft_inject hook must "
                f"return the adapted module names."
            )
        if not autocast_adapter_dtype:  # the plugins build adapters upcast; keep their layer's dtype instead
            for _, module in self._peft_modules():
                if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
                    _, dtype = adapter_placement(module.base_layer, autocast_adapter_dtype=False)
                    module.adapters[adapter_name].to(dtype=dtype)
        self.peft_config[adapter_name] = peft_config
        self._methods[adapter_name] = method
        self._injected[adapter_name] = list(injected)
        tensors = self._apply_state()[adapter_name]
        # Base tensors the method trains or loads for this adapter (biases): their originals come back on delete.
        declared = base_tensors(self.base_model.model, tensors)
        try:
            self._base_claims.check_free(adapter_name, declared)
        except PeftError:
            self.delete_adapter(adapter_name)
            raise
        self._base_claims.claim(adapter_name, declared.values())

    def injected_modules(self, adapter_name: str) -> list[str]:
        """The modules the adapter's plugin added or wrapped, as its ``peft_inject`` reported them."""
        return list(self._injected[adapter_name])

    def set_adapter(self, adapter_name: str | list[str] | Stack) -> None:
        """Make these adapters the active ones, applied in this order (``stack(["task", "language"])`` or a
        list); only active adapters train (unless in inference mode)."""
        if isinstance(adapter_name, Stack):
            if adapter_name.of_configs:
                raise PeftError("set_adapter takes a stack of adapter names; add new adapters with add_adapter.")
            adapter_name = list(adapter_name.names)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise PeftError(f"No adapter named {unknown[0]!r}; this model has {sorted(self.peft_config)}.")
        self.active_adapters = names
        self._apply_state()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left with no adapter get their base layer back."""
        if adapter_name not in self.peft_config:
            raise PeftError(f"No adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}.")
        if adapter_name in self._merged:
            self._unmerge(adapter_name)
        self._forget(adapter_name)
        for name, module in self._peft_modules():
            if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
                module.remove(adapter_name)
                if not module.adapters:
                    replace_module(self.base_model.model, name, module.base_layer)
            elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
                module.remove(adapter_name)
                if not module.modules_to_save:
                    replace_module(self.base_model.model, name, module.original_module)
        detach_soft_prompts(self.base_model.model, [adapter_name])
        self._base_claims.restore(adapter_name)
        del self.peft_config[adapter_name], self._methods[adapter_name], self._injected[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.active_adapters = [next(iter(self.peft_config))]
        self._apply_state()

    def _forget(self, adapter_name: str) -> None:
        """Let the adapter's plugin remove what it installed besides modules (hooks, allocators)."""
        registry().hook.peft_delete(
            model=self.base_model.model, config=self.peft_config[adapter_name], adapter_name=adapter_name
        )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block (merged adapters stay merged)."""
        self._disabled = True
        self._apply_state()
        try:
            yield
        finally:
            self._disabled = False
            self._apply_state()

    def _peft_modules(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in iter_modules(self.base_model.model) if isinstance(m, (AdapterLayer, ModulesToSave))]

    def _apply_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Push active/disabled state into every adapter module and set what trains; return each adapter's
        tensors (saved key -> live tensor), which that took."""
        self._resolved = {}
        for _, module in self._peft_modules():
            module.set_active(self.active_adapters)
            module.set_disabled(self._disabled)
        tensors = {name: self._adapter_tensors(name) for name in self.peft_config}
        for name, config in self.peft_config.items():
            trainable = name in self.active_adapters and not config.inference_mode
            for tensor in tensors[name].values():
                if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                    tensor.requires_grad_(trainable)
        return tensors

    def _adapter_tensors(self, adapter_name: str, for_saving: bool = False) -> dict[str, torch.Tensor]:
        tensors = registry().hook.peft_state_dict(
            model=self.base_model.model, config=self.peft_config[adapter_name], adapter_name=adapter_name,
            for_saving=for_saving,
        )
        return tensors if tensors is not None else {}

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
        **options: Any,
    ) -> None:
        """Add ``adapter_name`` (inactive), combining ``adapters`` of one method with ``weights``.

        ``combination_type`` and ``options`` are the method's (LoRA: ``linear``, ``cat``, ``svd``, ``ties``,
        ``ties_svd``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``, with ``svd_rank``, ``density``,
        ``majority_sign_method``, ... as in Hugging Face PEFT).
        """
        if adapter_name in self.peft_config:
            raise PeftError(f"An adapter named {adapter_name!r} exists already; delete it or pick another name.")
        unknown = [name for name in adapters if name not in self.peft_config]
        if unknown or not adapters:
            raise PeftError(f"add_weighted_adapter needs existing adapters; this model has {sorted(self.peft_config)}, "
                            f"not {unknown or adapters}.")
        if len(weights) != len(adapters):
            raise PeftError(f"add_weighted_adapter got {len(adapters)} adapters but {len(weights)} weights.")
        methods = {self._methods[name].name for name in adapters}
        if len(methods) > 1:
            raise PeftError(f"add_weighted_adapter combines adapters of one method; these are {sorted(methods)}.")
        done = registry().hook.peft_add_weighted_adapter(
            peft_model=self, adapters=list(adapters), weights=list(weights), adapter_name=adapter_name,
            combination_type=combination_type, options=options,
        )
        if done is None:
            raise PeftError(f"The {methods.pop()} method cannot combine adapters into a weighted one.")

    # --- merging -----------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; forward then costs nothing extra."""
        mark_shared_weights(self.base_model.model)
        for name in adapter_names or self.active_adapters:
            if name in self._merged:
                continue
            registry().hook.peft_merge(
                model=self.base_model.model, config=self.peft_config[name], adapter_name=name, safe_merge=safe_merge
            )
            self._merged.append(name)
        self._apply_state()

    def unmerge_adapter(self) -> None:
        """Undo every merge, restoring the base weights."""
        for name in reversed(list(self._merged)):
            self._unmerge(name)
        self._apply_state()

    def _unmerge(self, name: str) -> None:
        registry().hook.peft_unmerge(model=self.base_model.model, config=self.peft_config[name], adapter_name=name)
        self._merged.remove(name)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None,
        keep_unmergeable: bool = False,
    ) -> nn.Module:
        """Merge adapters (default: the active ones) and return the base model with no adapter modules.

        ``progressbar=True`` shows a progress bar over the modules taken out. ``modules_to_save`` are replaced
        by the active adapter's trained copy. Soft prompts cannot be merged: with one among the adapters this
        raises, unless ``keep_unmergeable=True``, which merges the others and returns this ``PeftModel`` holding
        only the soft prompts.
        """
        names = list(adapter_names or self.active_adapters)
        unmergeable = [n for n in names if not self._methods[n].merges]
        if unmergeable and not keep_unmergeable:
            raise PeftError(
                f"Adapters {unmergeable} act on the model's inputs (soft prompts) and cannot be merged into "
                f"weights; merge_and_unload would drop them. Pass keep_unmergeable=True to merge the others and "
                f"keep these on the returned PeftModel, or adapter_names=[...] to merge only the others."
            )
        merged = [n for n in names if n not in unmergeable]
        self.merge_adapter(merged, safe_merge=safe_merge)
        for name in [n for n in self.peft_config if n not in unmergeable]:
            # What a merged adapter did to base tensors (trained biases) is part of the merged model; what
            # an adapter dropped without merging did is undone.
            if name in merged:
                self._base_claims.release(name)
            else:
                self._base_claims.restore(name)
            self._forget(name)
        if not unmergeable:
            return self._strip(keep_trained_copies=True, progressbar=progressbar)
        self._strip(keep_trained_copies=True, keep_soft_prompts=True, progressbar=progressbar)
        for name in [n for n in self.peft_config if n not in unmergeable]:
            del self.peft_config[name], self._methods[name], self._injected[name]
        self._merged, self.active_adapters = [], unmergeable
        self._apply_state()
        return self

    def unload(self) -> nn.Module:
        """Return the base model as it was: adapters unmerged and removed, original modules back."""
        self.unmerge_adapter()
        for name in self.peft_config:
            self._base_claims.restore(name)
            self._forget(name)
        return self._strip(keep_trained_copies=False)

    def _strip(
        self, keep_trained_copies: bool, keep_soft_prompts: bool = False, progressbar: bool = False
    ) -> nn.Module:
        model = self.base_model.model
        modules = self._peft_modules()
        if progressbar:
            from tqdm.auto import tqdm

            modules = tqdm(modules, desc="Unloading and merging model")
        for name, module in modules:
            if isinstance(module, AdapterLayer):
                replace_module(model, name, module.base_layer)
            elif keep_trained_copies and module.active_adapter is not None:
                replace_module(model, name, module.modules_to_save[module.active_adapter])
            else:
                replace_module(model, name, module.original_module)
        if keep_trained_copies:
            record_untied_embeddings(model)
        if keep_soft_prompts:
            return model
        detach_soft_prompts(model)
        if self._generation_hook is not None:
            self._generation_hook.remove()
            self._generation_hook = None
        return model

    # --- parameters --------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters); a packed (quantized) weight counts as the elements it stands
        for, as its plugin's ``LayerType.weight_elements`` says."""
        packed = {}
        for module in self.modules():
            registered = registry().layer_type(qualified_names(module))
            if registered is not None and registered.weight_elements is not None:
                packed[id(module.weight)] = registered.weight_elements(module)
        trainable = total = 0
        for param in self.parameters():
            count = packed.get(id(param), param.numel())
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # --- saving and loading ------------------------------------------------------------------

    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True,
        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Save adapters in the Hugging Face PEFT format: ``default`` at the top, others in subfolders.

        With several adapters active (a stack), ``peft_stack.json`` at the top lists them in order, and
        ``from_pretrained`` on the directory loads the whole stack. As in transformers, only the main
        process writes (``is_main_process``), and ``state_dict`` (this model's, e.g. gathered from FSDP
        shards) supplies the values of the adapter tensors instead of the live ones.

        Everything one call writes changes as one unit (see :mod:`peft_core.directory_commit`): a reader,
        a concurrent save or a kill at any moment leaves the earlier files or these, never a mix.

        The arguments are Hugging Face PEFT's. Only safetensors is written (``safe_serialization=False`` is
        refused); the embeddings are saved as ``modules_to_save`` copies or adapters, never as base weights
        (``save_embedding_layers=True`` is refused); PiSSA-to-LoRA conversion on saving is not supported.
        """
        unsupported = {
            "safe_serialization=False": not safe_serialization,
            "save_embedding_layers=True": save_embedding_layers is True,
            "path_initial_model_for_weight_conversion": path_initial_model_for_weight_conversion is not None,
        }
        for argument in [a for a, asked in unsupported.items() if asked]:
            raise PeftError(f"save_pretrained({argument}) is not supported: adapters are saved as safetensors, with "
                            f"their own tensors only. Leave the argument at its default.")
        if not is_main_process:
            return
        if os.path.isfile(save_directory):
            raise PeftError(f"{save_directory} is a file; save_pretrained needs a directory.")
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise PeftError(f"selected_adapters names {unknown}, which this model does not have; it has "
                            f"{sorted(self.peft_config)}.")
        files, checksums = {}, {}
        for name in names:
            tensors = self._adapter_tensors(name, for_saving=True)
            if state_dict is not None:
                tensors = self._values_from(state_dict, tensors)
            config_json = self.peft_config[name].to_json_string(inference_mode=True)
            folder = "" if name == "default" else f"{name}/"
            files.update({folder + file: write for file, write in adapter_files(config_json, tensors).items()})
            checksums[name] = hashlib.sha256(config_json.encode()).hexdigest()
        stacked = [n for n in self.active_adapters if n in names]
        if len(stacked) > 1:
            manifest = manifest_json(stacked, {n: checksums[n] for n in stacked}).encode()
            files[MANIFEST_NAME] = lambda path: Path(path).write_bytes(manifest)
        with staged_commit(save_directory, also_lock=[n for n in names if n != "default"]) as staging:
            write_files(staging, files)
            if len(stacked) <= 1 and _stale_manifest(save_directory, names):
                staging.remove(MANIFEST_NAME)

    def _values_from(
        self, state_dict: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``tensors`` with each live tensor replaced by its entry in ``state_dict`` (keyed by parameter
        name, wrapper components ignored); derived tensors (a prompt encoder's output) stay as they are."""
        by_name = {plain_name(k): v for k, v in state_dict.items()}
        names = {id(t): plain_name(n) for n, t in [*self.named_parameters(), *self.named_buffers()]}
        return {key: by_name.get(names.get(id(t), ""), t) for key, t in tensors.items()}

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapters (``save_pretrained``'s files) and a model card to a Hub repo; see
        :func:`peft_core.hub.push_to_hub` for the options (``private``, ``commit_message``, ``token``, ...)."""
        from peft_core.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
        is_trainable: bool = False, config: PeftConfig | None = None, autocast_adapter_dtype: bool = True, *,
        allow_legacy_bin: bool = False, verify_integrity: bool = True, allow_embedding_layers: bool = False,
        **hub_kwargs: Any,
    ) -> PeftModel:
        """Load a saved adapter, or a saved stack of them, (a directory or a Hub repo id) onto ``model``.

        ``hub_kwargs``: ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``. With
        ``is_trainable=False`` (the default) the adapter is frozen, for inference. A load that fails leaves
        ``model`` as it was. How the files are read:

        - ``allow_legacy_bin=True`` reads an adapter saved only as a pickled ``adapter_model.bin`` (with
          ``weights_only=True``; refused by default);
        - ``verify_integrity=False`` loads files whose checksums say they do not belong together (a config
          edited by hand after saving); by default that is an error;
        - ``allow_embedding_layers=True`` lets the file replace the model's input and output embedding
          weights where its config does not declare them (Hugging Face PEFT saves them for a resized
          vocabulary); the originals come back when the adapter is deleted.
        """
        options = LoadOptions(allow_legacy_bin, verify_integrity, allow_embedding_layers)
        with reading(model_id):  # every member from one save
            manifest = None if config is not None else resolve_file(model_id, MANIFEST_NAME, required=False,
                                                                    **hub_kwargs)
            if manifest is None:
                return cls._from_one(model, model_id, adapter_name, is_trainable, config, hub_kwargs, options,
                                     autocast_adapter_dtype)
            stack = read_manifest(manifest)
            first = stack.names[0]
            peft_model = cls._from_one(model, model_id, first, is_trainable, None, _member_kwargs(first, hub_kwargs),
                                       options, autocast_adapter_dtype, stack)
            try:
                for name in stack.names[1:]:
                    peft_model._load_adapter(model_id, name, is_trainable, autocast_adapter_dtype, options,
                                             _member_kwargs(name, hub_kwargs), stack)
            except Exception:
                peft_model.unload()
                raise
        peft_model.set_adapter(stack.names)
        return peft_model

    @classmethod
    def _from_one(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool,
        config: PeftConfig | None, hub_kwargs: dict[str, Any], options: LoadOptions, autocast_adapter_dtype: bool,
        manifest: Manifest | None = None,
    ) -> PeftModel:
        saved = options.read(model_id, hub_kwargs, manifest, adapter_name, with_config=config is None)
        config = config or saved.peft_config()
        # Built as for inference, which is the shape of what was saved (a soft prompt's final rows, not the
        # encoder that trained them); training continues from exactly those tensors.
        config.inference_mode = True
        target_cls = TASK_MODELS.get(config.task_type, cls) if cls is PeftModel else cls
        peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not is_trainable:
            peft_model.eval()
        try:
            peft_model._load_saved(adapter_name, saved, str(model_id), options.allow_embedding_layers)
        except Exception:
            peft_model.unload()  # hand the caller's model back as it was
            raise
        peft_model._set_trainable(adapter_name, is_trainable)
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, *,
        autocast_adapter_dtype: bool = True, allow_legacy_bin: bool = False, verify_integrity: bool = True,
        allow_embedding_layers: bool = False, shared_base: bool = False, **hub_kwargs: Any,
    ) -> None:
        """Add a saved adapter under ``adapter_name`` (inactive until ``set_adapter``); the options as in
        :meth:`from_pretrained`. A load that fails leaves the model as it was.

        ``shared_base=True`` (what :class:`~peft_core.serving.ServingModel` asks) refuses an adapter whose
        file would change tensors of the base model, which the other adapters are served on, and refuses
        any adapter while another one has changed them.
        """
        options = LoadOptions(allow_legacy_bin, verify_integrity, allow_embedding_layers)
        self._load_adapter(model_id, adapter_name, is_trainable, autocast_adapter_dtype, options, hub_kwargs,
                           shared_base=shared_base)

    def _load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool, autocast_adapter_dtype: bool,
        options: LoadOptions, hub_kwargs: dict[str, Any], manifest: Manifest | None = None, shared_base: bool = False,
    ) -> None:
        if shared_base:
            self.refuse_changed_base(adapter_name)
        saved = options.read(model_id, hub_kwargs, manifest, adapter_name)
        config = saved.peft_config()
        config.inference_mode = True  # as in from_pretrained
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            self._load_saved(adapter_name, saved, str(model_id), options.allow_embedding_layers, shared_base)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._set_trainable(adapter_name, is_trainable)

    def load_adapter_weights(
        self, directory: str | os.PathLike, adapter_name: str, *, allow_legacy_bin: bool = False,
        verify_integrity: bool = True, allow_embedding_layers: bool = False, **hub_kwargs: Any,
    ) -> None:
        """Copy the weights saved for ``adapter_name`` (at the top of ``directory`` for ``default``, else in
        its subfolder, as ``save_pretrained`` lays them out) into this model's existing adapter."""
        options = LoadOptions(allow_legacy_bin, verify_integrity, allow_embedding_layers)
        saved = options.read(directory, _member_kwargs(adapter_name, hub_kwargs))
        self._load_saved(adapter_name, saved, str(directory), allow_embedding_layers)

    def _set_trainable(self, adapter_name: str, trainable: bool) -> None:
        self.peft_config[adapter_name].inference_mode = not trainable
        self._apply_state()

    def _load_saved(
        self, adapter_name: str, saved: SavedAdapter, source: str, allow_embedding_layers: bool = False,
        shared_base: bool = False,
    ) -> None:
        """Copy a saved adapter's tensors into the live adapter ``adapter_name``, all or nothing.

        Saved keys beyond the method's own mapping may address base-model tensors only where the config
        declares them (see :mod:`peft_core.base_tensors`); the originals of the base tensors the file
        changes are kept, and written back when the adapter is deleted.
        """
        loaded, model = saved.tensors, self.base_model.model
        targets = self._adapter_tensors(adapter_name)
        # Names start with base_model.model., as saved keys do; a tied weight answers to each of its names.
        live = dict(self.named_parameters(remove_duplicate=False))
        targets.update(
            declared_base_tensors(model, live, loaded, targets, adapter_name, source, allow_embedding_layers)
        )
        check_vocabulary(model, loaded, targets, source)
        check_fit(targets, loaded, source)
        changed = changes_values(base_tensors(model, targets), loaded)
        if changed and shared_base:
            raise AdapterLoadError(
                f"The adapter in {source} would change {len(changed)} tensors of the base model (e.g. "
                f"{next(iter(changed))!r}), which the other adapters served from this model use too. Serve it from "
                f"a model of its own."
            )
        self._base_claims.check_free(adapter_name, changed)
        self._base_claims.claim(adapter_name, changed.values())
        copy_values(targets, loaded)

    def refuse_changed_base(self, adapter_name: str) -> None:
        """Refuse to add ``adapter_name`` to a model whose base tensors another adapter has changed: it would run
        on those values, not on the base model it was trained for (what a server must not do silently)."""
        changed = [name for name in self._base_claims.names() if self._base_claims.changed(name)]
        if changed:
            raise PeftError(
                f"Adapters {changed} changed tensors of the base model (trained or loaded biases or embeddings), so "
                f"adapter {adapter_name!r} would run on their values, not on the base model. Serve it from a model of "
                f"its own, or delete {changed} first."
            )


@dataclass(frozen=True)
class LoadOptions:
    """How saved files are read and what they may replace (see :meth:`PeftModel.from_pretrained`)."""

    allow_legacy_bin: bool = False
    verify_integrity: bool = True
    allow_embedding_layers: bool = False

    def read(
        self, model_id: str | os.PathLike, hub_kwargs: dict[str, Any], manifest: Manifest | None = None,
        adapter_name: str = "", with_config: bool = True,
    ) -> SavedAdapter:
        saved = read_adapter(model_id, allow_legacy_bin=self.allow_legacy_bin, verify_integrity=self.verify_integrity,
                             with_config=with_config, **hub_kwargs)
        if manifest is not None and self.verify_integrity:
            manifest.check_member(adapter_name, saved.config_sha256, str(model_id))
        return saved


class PeftModelForCausalLM(PeftModel):
    """A causal language model with adapters."""


class PeftModelForSeq2SeqLM(PeftModel):
    """An encoder-decoder model with adapters."""


class PeftModelForSequenceClassification(PeftModel):
    """A sequence classifier with adapters; its head trains and is saved with every adapter."""

    TASK_MODULES_TO_SAVE = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    """A token classifier with adapters; its head trains and is saved with every adapter."""

    TASK_MODULES_TO_SAVE = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    """An extractive question-answering model with adapters; its span head trains with them."""

    TASK_MODULES_TO_SAVE = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    """An encoder producing features, with adapters."""


TASK_MODELS: dict[str | None, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def _forward_signature() -> inspect.Signature:
    """The inputs transformers models commonly take, named, then ``adapter_names`` and ``**kwargs``.

    ``forward`` takes any keywords; tools that read its signature to decide which inputs to pass (the
    ``Trainer`` drops dataset columns a model's forward does not name) see these.
    """
    keyword = inspect.Parameter.KEYWORD_ONLY
    names = ("input_ids", "attention_mask", "inputs_embeds", "labels", "position_ids", "token_type_ids",
             "decoder_input_ids", "decoder_attention_mask", "pixel_values", "adapter_names")
    return inspect.Signature([
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *(inspect.Parameter(name, keyword, default=None) for name in names),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ])


PeftModel.forward.__signature__ = _forward_signature()


def prepare_config(model: nn.Module, config: PeftConfig, peft_model_class: type[PeftModel]) -> None:
    """Complete ``config`` for ``model`` before quantization and injection: the base model's name, and the
    task's trained heads (a classifier) among ``modules_to_save``."""
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        # diffusers keeps the Path a model was loaded from; the saved config needs a string.
        config.base_model_name_or_path = os.fspath(name) if name else None
    task_modules = peft_model_class.TASK_MODULES_TO_SAVE
    if task_modules and hasattr(config, "modules_to_save"):
        extra = [m for m in task_modules if m not in (config.modules_to_save or [])]
        config.modules_to_save = [*(config.modules_to_save or []), *extra]


def _stale_manifest(directory: str | os.PathLike, saved_names: list[str]) -> bool:
    """Whether the directory holds a stack manifest naming one of the adapters a save replaces without
    writing a stack: that stack would no longer be the one saved."""
    path = committed_path(directory, MANIFEST_NAME)
    if path is None:
        return False
    try:
        return bool(set(read_manifest(path).names) & set(saved_names))
    except AdapterLoadError:
        return True  # a broken manifest of ours: it goes


def _member_kwargs(name: str, hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Where a stack member is: ``default`` at the top of the stack's folder, others in subfolders."""
    if name == "default":
        return hub_kwargs
    parent = hub_kwargs.get("subfolder")
    return {**hub_kwargs, "subfolder": f"{parent}/{name}" if parent else name}


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig | Stack, adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
) -> PeftModel:
    """Wrap ``model`` with a new adapter, or a ``stack([...])`` of them; the class follows the task type.

    ``autocast_adapter_dtype=True`` (the default, as in Hugging Face PEFT) makes the adapters of float16 or
    bfloat16 layers float32; ``False`` keeps their layer's dtype.
    """
    return TASK_MODELS.get(peft_config.task_type, PeftModel)(model, peft_config, adapter_name, autocast_adapter_dtype)
