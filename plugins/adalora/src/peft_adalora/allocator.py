"""The rank allocator, the orthogonality penalty, and the ways to run the allocator without forgetting it.

One :class:`RankAllocator` per AdaLoRA adapter is made at injection and kept on the transformers model
(``model._adalora_allocators``, adapter name -> allocator) until the adapter is deleted (``peft_delete``).
Through the core's ``peft_loss`` hook, each training call of the model with a loss (never a layer's
forward):

* adds ``orth_reg_weight * mean(||A A^T - I||_F, ||B^T B - I||_F over the adapter's matrices)`` to the
  loss (the mean is Hugging Face PEFT's normalisation);
* counts the call, and warns once if ``tinit + WARN_MARGIN`` of them ran while :func:`update_and_allocate`
  was never called.

:func:`update_and_allocate` must run after every optimizer step (before ``zero_grad``): it reads the
gradients. :func:`install_allocator` makes the optimizer do it; :class:`~peft_adalora.AdaLoraCallback`
does it in a transformers ``Trainer``.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import torch
from peft_core.errors import PeftError
from peft_core.layer import AdapterLayer
from torch import nn

from peft_adalora.config import AdaLoraConfig
from peft_adalora.layer import SVDAdapter

WARN_MARGIN = 8  # training forwards past tinit (gradient accumulation runs several per step) before warning


class RankAllocator:
    """Importance scores and the budget schedule for one adapter's layers."""

    def __init__(self, config: AdaLoraConfig, adapter_name: str, layers: list[tuple[str, AdapterLayer]]) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.names = [name for name, _ in layers]
        self.layers = [layer for _, layer in layers]
        self.adapters: list[SVDAdapter] = [layer.adapters[adapter_name] for layer in self.layers]
        self.init_budget = sum(a.r for a in self.adapters)
        self.target_budget = config.target_r * len(self.adapters)
        self.calls = 0  # update_and_allocate calls
        self.train_forwards = 0
        self.warned = False
        self.final_keep: list[torch.Tensor] | None = None
        self.reset_importance()

    def reset_importance(self) -> None:
        self.exp_ipt: list[torch.Tensor] | None = None  # sensitivity EMA, one tensor per A, E, B
        self.exp_unc: list[torch.Tensor] | None = None  # uncertainty EMA

    # --- state of the adapter ------------------------------------------------------------------

    def params(self) -> list[nn.Parameter]:
        return [p for a in self.adapters for p in (a.lora_A, a.lora_E, a.lora_B)]

    def attached(self) -> bool:
        layer, adapter = self.layers[0], self.adapters[0]
        return layer.adapters[self.adapter_name] is adapter if self.adapter_name in layer.adapters else False

    def applied(self) -> bool:
        """Attached, active, unmerged and enabled: forward uses it."""
        layer = self.layers[0]
        return (
            self.attached() and self.adapter_name in layer.active_adapters and not layer.disabled
            and self.adapter_name not in layer.merged_adapters
        )

    # --- the schedule --------------------------------------------------------------------------

    def budget(self, step: int) -> tuple[int, bool]:
        """(rank budget, whether to mask at this step): full until tinit, cubic down to the target."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step >= c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def update_importance(self) -> None:
        """Smooth ``|w * grad|`` (beta1) and its deviation from the smoothed value (beta2)."""
        params = self.params()
        with torch.no_grad():
            ipt = [
                (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p) for p in params
            ]
            if self.exp_ipt is None:
                self.exp_ipt = [torch.zeros_like(p) for p in params]
                self.exp_unc = [torch.zeros_like(p) for p in params]
            b1, b2 = self.config.beta1, self.config.beta2
            torch._foreach_mul_(self.exp_ipt, b1)
            torch._foreach_add_(self.exp_ipt, ipt, alpha=1 - b1)
            deviation = torch._foreach_sub(ipt, self.exp_ipt)
            torch._foreach_abs_(deviation)
            torch._foreach_mul_(self.exp_unc, b2)
            torch._foreach_add_(self.exp_unc, deviation, alpha=1 - b2)

    def triplet_scores(self) -> list[torch.Tensor]:
        """Per layer, the score of each singular triplet: E's own plus A's row mean plus B's column mean."""
        assert self.exp_ipt is not None and self.exp_unc is not None
        scores = torch._foreach_mul(self.exp_ipt, self.exp_unc)
        out = []
        for i in range(len(self.adapters)):
            s_a, s_e, s_b = scores[3 * i : 3 * i + 3]
            out.append(s_e.view(-1) + s_a.mean(dim=1) + s_b.mean(dim=0))
        return out

    def mask_to_budget(self, budget: int) -> list[torch.Tensor]:
        """Zero the ``init_budget - budget`` least important singular values; return the kept masks."""
        if self.exp_ipt is None:
            self.update_importance()
        scores = self.triplet_scores()
        flat = torch.cat(scores)
        keep = torch.ones_like(flat, dtype=torch.bool)
        drop = self.init_budget - budget
        if drop > 0:
            keep[torch.topk(flat, drop, largest=False).indices] = False
        masks = list(torch.split(keep, [s.numel() for s in scores]))
        self.apply(masks)
        return masks

    def apply(self, masks: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for adapter, keep in zip(self.adapters, masks, strict=True):
                adapter.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def rank_pattern(self, masks: list[torch.Tensor]) -> dict[str, list[bool]]:
        return {f"{name}.lora_E": keep.tolist() for name, keep in zip(self.names, masks, strict=True)}

    def step(self, global_step: int) -> None:
        """One call of the schedule (Hugging Face PEFT's ``update_and_allocate`` semantics)."""
        self.calls += 1
        c = self.config
        final_step = c.total_step - c.tfinal
        if global_step < final_step:
            self.update_importance()
            budget, mask_now = self.budget(global_step)
            if mask_now:
                c.rank_pattern = self.rank_pattern(self.mask_to_budget(budget))
        elif global_step == final_step or self.final_keep is None:
            self.final_keep = self.mask_to_budget(self.target_budget)
            c.rank_pattern = self.rank_pattern(self.final_keep)
            self.reset_importance()
        else:  # after the final allocation: keep the final mask (the optimizer may move masked values)
            self.apply(self.final_keep)

    # --- the training loss's part ---------------------------------------------------------------

    def orthogonal_penalty(self) -> torch.Tensor:
        terms = []
        for a in self.adapters:
            for gram in (a.lora_A @ a.lora_A.t(), a.lora_B.t() @ a.lora_B):  # both (r, r)
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return torch.stack(terms).mean()

    def count_forward(self) -> None:
        self.train_forwards += 1
        if not self.warned and self.calls == 0 and self.train_forwards > self.config.tinit + WARN_MARGIN:
            self.warned = True
            warnings.warn(
                f"AdaLoRA adapter {self.adapter_name!r} has run {self.train_forwards} training forward passes, "
                f"but update_and_allocate was never called, so no rank is being allocated. Call "
                f"peft_adalora.install_allocator(model, optimizer) once, add peft_adalora.AdaLoraCallback() to "
                f"the Trainer's callbacks, or call peft_adalora.update_and_allocate(model, step) after every "
                f"optimizer.step().",
                stacklevel=4,
            )


def allocators(model: nn.Module) -> dict[str, RankAllocator]:
    """The allocators kept on a transformers model, by adapter name (created on first use; the plugin's
    ``peft_delete`` removes an adapter's, and the dict with the last one)."""
    return model.__dict__.setdefault("_adalora_allocators", {})


def training_penalty(model: nn.Module, adapter_name: str) -> torch.Tensor | None:
    """The orthogonality penalty of one adapter for this training call (``peft_loss``), which also counts the
    call for the warning about an allocator never run."""
    allocator = allocators(model).get(adapter_name)
    if allocator is None or not allocator.applied() or not torch.is_grad_enabled():
        return None
    allocator.count_forward()
    weight = allocator.config.orth_reg_weight
    return weight * allocator.orthogonal_penalty() if weight > 0 else None


def forget(model: nn.Module, adapter_name: str) -> None:
    """Drop the adapter's allocator, and the model's table of them with the last one."""
    found = allocators(model)
    found.pop(adapter_name, None)
    if not found:
        del model.__dict__["_adalora_allocators"]


def _base_model(peft_model: nn.Module) -> nn.Module:
    getter = getattr(peft_model, "get_base_model", None)
    return getter() if callable(getter) else peft_model


def update_and_allocate(peft_model: nn.Module, global_step: int) -> None:
    """Update importance scores and mask singular values to this step's budget, for each trainable adapter.

    Call it after every ``optimizer.step()`` and before ``zero_grad()``, with the 0-based step index (or let
    :func:`install_allocator` / ``AdaLoraCallback`` call it).
    """
    model = _base_model(peft_model)
    configs = getattr(peft_model, "peft_config", {})
    live = [
        a for name, a in allocators(model).items()
        if not a.config.inference_mode and a.attached() and configs.get(name, a.config) is a.config
    ]
    if not live:
        raise PeftError(
            "update_and_allocate found no trainable AdaLoRA adapter on this model. Build it with "
            "get_peft_model(model, AdaLoraConfig(...)) (or load it with is_trainable=True)."
        )
    for allocator in live:
        allocator.step(global_step)


def install_allocator(peft_model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Run :func:`update_and_allocate` after every ``optimizer.step()``, counting steps from 0.

    Returns the hook handle (``handle.remove()`` stops it). Use one optimizer step per training step.
    """
    steps = itertools.count()

    def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        update_and_allocate(peft_model, next(steps))

    return optimizer.register_step_post_hook(after_step)
