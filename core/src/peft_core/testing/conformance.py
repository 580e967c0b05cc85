"""The conformance suite: what every method plugin must do, checked the same way for ours and for yours.

Subclass :class:`MethodConformance` in a test module of your plugin and say how to configure your method;
pytest (with peft-core installed, its plugin is active) runs every check on every tiny model you list::

    from peft_core.testing.conformance import MethodConformance

    class TestBitFit(MethodConformance):
        models = ("llama", "gpt2", "bert-classifier")

        def config(self, kind):
            return BitFitConfig(target_modules=TARGETS[kind], task_type=TASK_TYPES[kind])

        bad_configs = [(lambda: BitFitConfig(target_modules=5), "target_modules must be")]

The checks: injection changes only what the method reports; only the adapter's tensors train and the base
stays as it was; save and load give equal outputs; the saved keys are the method's, stable across names
and reloads; merge then unmerge restores the outputs and the base weights (for methods registered with
``merges=True``); the method works in ``stack([...])`` with the kit's own reference method (an additive
low-rank term, so the run needs nothing but peft-core); injection works on the ``meta`` device;
a bfloat16 base trains; bad configs raise a :class:`~peft_core.errors.PeftError` naming the problem.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from peft_core.config import PeftConfig
from peft_core.errors import PeftError
from peft_core.model import TASK_MODELS, PeftModel, get_peft_model, prepare_config
from peft_core.plugins import registry
from peft_core.stacking import stack
from peft_core.testing.models import TINY_MODELS, tiny_model
from peft_core.testing.reference import ReferenceConfig, register_reference_method
from peft_core.testing.training import train_steps

TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert-classifier": "SEQ_CLS"}
# The query and value projections of each tiny model: targets for LoRA-like methods, and the reference method.
ATTENTION_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert-classifier": ["query", "value"]}


def call_inputs(kind: str) -> dict[str, torch.Tensor]:
    """A fixed batch with labels for the tiny model ``kind``."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(2, 128, (2, 8), generator=generator)
    labels = torch.tensor([0, 2]) if TASK_TYPES[kind] == "SEQ_CLS" else input_ids
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def outputs(model: nn.Module, kind: str) -> torch.Tensor:
    """Logits of the real tokens (soft prompts add virtual positions in front)."""
    with torch.no_grad():
        logits = model(**call_inputs(kind)).logits
    return logits if logits.dim() == 2 else logits[:, -call_inputs(kind)["input_ids"].shape[1]:]


class MethodConformance:
    """Subclass it as ``Test<Method>`` and implement :meth:`config`; see the module docstring."""

    #: The tiny models (``peft_core.testing.TINY_MODELS``) the method applies to.
    models: ClassVar[tuple[str, ...]] = ("llama", "gpt2", "bert-classifier")
    #: ``(make_bad_config, message_regex)``: building the config, or injecting it, must raise a PeftError.
    bad_configs: ClassVar[list[tuple[Callable[[], PeftConfig], str]]] = []
    #: Whether injection into a model on the ``meta`` device (no memory) works; if not, it must raise a
    #: PeftError saying so.
    meta_device: ClassVar[bool] = True
    #: Steps and learning rate of the short training runs.
    train_steps: ClassVar[int] = 3
    learning_rate: ClassVar[float] = 1e-2
    #: Tolerance of output comparisons after merging (float rounding of the merged weights).
    merge_tolerance: ClassVar[float] = 1e-4

    def config(self, kind: str) -> PeftConfig:
        """A new config of the method for the tiny model ``kind``."""
        raise NotImplementedError(f"{type(self).__name__} must implement config(kind).")

    # --- helpers -------------------------------------------------------------------------------

    def base(self, kind: str, tiny_model_dir: Callable[[str], Path], **load_kwargs: Any) -> nn.Module:
        return tiny_model(kind, tiny_model_dir(kind), **load_kwargs)

    def loading_base(self, kind: str, tiny_model_dir: Callable[[str], Path]) -> nn.Module:
        """The base a saved adapter of the method is loaded onto (a quantizing method quantizes it first)."""
        return self.base(kind, tiny_model_dir)

    def trained(self, kind: str, tiny_model_dir: Callable[[str], Path], name: str = "default") -> PeftModel:
        """The method on a fresh base, trained a few steps so that its weights are no longer initial."""
        torch.manual_seed(0)
        model = get_peft_model(self.base(kind, tiny_model_dir), self.config(kind), name)
        train_steps(model, call_inputs(kind), steps=self.train_steps, lr=self.learning_rate)
        return model

    @staticmethod
    def adapter_tensors(model: PeftModel, name: str = "default") -> dict[str, torch.Tensor]:
        return model._adapter_tensors(name)

    # --- the checks ----------------------------------------------------------------------------

    def test_injection_changes_only_what_it_reports(self, kind, tiny_model_dir):
        base, config = self.base(kind, tiny_model_dir), self.config(kind)
        prepare_config(base, config, TASK_MODELS.get(config.task_type, PeftModel))
        registry().hook.peft_quantize(model=base, config=config)  # quantizing replaces layers: not injection
        before = dict(base.named_modules())
        model = get_peft_model(base, config)
        reported = model.injected_modules("default")
        assert reported, "the method injected nothing"
        for name, module in model.base_model.model.named_modules():
            inside_reported = any(name == r or name.startswith(r + ".") for r in reported)
            if name in before and not inside_reported:
                assert module is before[name], f"'{name}' changed, but the method did not report it"
        modules = dict(model.base_model.model.named_modules())
        assert all(name in modules for name in reported), "a reported name is no module of the model"

    def test_only_the_adapter_trains(self, kind, tiny_model_dir):
        torch.manual_seed(0)
        model = get_peft_model(self.base(kind, tiny_model_dir), self.config(kind))
        adapter = {id(t) for t in self.adapter_tensors(model).values()}
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable, "nothing trains"
        assert all(id(p) in adapter for p in model.parameters() if p.requires_grad), \
            "a trainable parameter is not among the adapter's tensors"
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in adapter}
        losses = train_steps(model, call_inputs(kind), steps=self.train_steps, lr=self.learning_rate)
        assert all(torch.isfinite(torch.tensor(losses)))
        for name, param in model.named_parameters():
            if name in frozen:
                assert torch.equal(param, frozen[name]), f"the base parameter {name} changed"
        assert (outputs(model, kind) - outputs(self.base(kind, tiny_model_dir), kind)).abs().max() > 1e-5, \
            "after training, the adapter does not change the outputs"

    def test_save_and_load_give_equal_outputs(self, kind, tiny_model_dir, tmp_path):
        model = self.trained(kind, tiny_model_dir)
        model.eval()
        expected = outputs(model, kind)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(self.loading_base(kind, tiny_model_dir), tmp_path)
        torch.testing.assert_close(outputs(loaded, kind), expected)

    def test_saved_keys_are_stable(self, kind, tiny_model_dir, tmp_path):
        from safetensors.torch import load_file

        model = self.trained(kind, tiny_model_dir)
        model.add_adapter("second", self.config(kind))
        model.save_pretrained(tmp_path)
        first = load_file(tmp_path / "adapter_model.safetensors")
        second = load_file(tmp_path / "second" / "adapter_model.safetensors")
        assert first.keys() == second.keys(), "saved keys depend on the adapter's name"
        assert not any("default" in key or "second" in key for key in first), "saved keys name the adapter"
        loaded = PeftModel.from_pretrained(self.loading_base(kind, tiny_model_dir), tmp_path)
        loaded.save_pretrained(tmp_path / "again")
        again = load_file(tmp_path / "again" / "adapter_model.safetensors")
        assert again.keys() == first.keys()
        for key, tensor in first.items():
            torch.testing.assert_close(again[key], tensor)

    def test_merge_and_unmerge_restore_outputs(self, kind, tiny_model_dir):
        model = self.trained(kind, tiny_model_dir)
        model.eval()
        adapted, plain = outputs(model, kind), outputs(self.base(kind, tiny_model_dir), kind)
        if not registry().method_for_config(self.config(kind)).merges:
            with pytest.raises(PeftError):
                model.merge_adapter()
            return
        base_weights = {n: p.detach().clone() for n, p in model.base_model.model.named_parameters()}
        model.merge_adapter()
        tolerance = dict(atol=self.merge_tolerance, rtol=self.merge_tolerance)
        torch.testing.assert_close(outputs(model, kind), adapted, **tolerance)
        model.unmerge_adapter()
        for name, param in model.base_model.model.named_parameters():
            torch.testing.assert_close(param, base_weights[name], **tolerance)
        with model.disable_adapter():
            torch.testing.assert_close(outputs(model, kind), plain, **tolerance)
        torch.testing.assert_close(outputs(model.merge_and_unload(), kind), adapted, **tolerance)

    def test_works_in_a_stack(self, kind, tiny_model_dir, tmp_path):
        register_reference_method()
        torch.manual_seed(0)
        other = ReferenceConfig(target_modules=ATTENTION_TARGETS[kind], task_type=TASK_TYPES[kind])
        # The method first: a quantizing method quantizes the base, then the reference method adapts it.
        model = get_peft_model(self.base(kind, tiny_model_dir), stack([self.config(kind), other], names=["it", "ref"]))
        losses = train_steps(model, call_inputs(kind), steps=self.train_steps, lr=self.learning_rate)
        assert all(torch.isfinite(torch.tensor(losses)))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any(".ref_" in n for n in trained) and len(trained) > 2
        model.eval()
        expected = outputs(model, kind)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(self.loading_base(kind, tiny_model_dir), tmp_path)
        assert loaded.active_adapters == ["it", "ref"]
        torch.testing.assert_close(outputs(loaded, kind), expected)

    def test_injects_on_the_meta_device(self, kind):
        with torch.device("meta"):
            base = TINY_MODELS[kind]()
        if not self.meta_device:  # then it must say so, not fail deep inside torch
            with pytest.raises(PeftError):
                get_peft_model(base, self.config(kind))
            return
        model = get_peft_model(base, self.config(kind))
        tensors = self.adapter_tensors(model)
        assert tensors and all(t.device.type == "meta" for t in tensors.values())

    def test_trains_on_a_bfloat16_base(self, kind, tiny_model_dir):
        torch.manual_seed(0)
        model = get_peft_model(self.base(kind, tiny_model_dir, dtype=torch.bfloat16), self.config(kind))
        losses = train_steps(model, call_inputs(kind), steps=2, lr=self.learning_rate)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert outputs(model, kind).dtype == torch.bfloat16

    def test_bad_configs_raise_clear_errors(self, kind, tiny_model_dir):
        assert self.bad_configs, f"{type(self).__name__}.bad_configs lists no invalid config to check"
        for make, message in self.bad_configs:
            with pytest.raises(PeftError, match=message):
                get_peft_model(self.base(kind, tiny_model_dir), make())
