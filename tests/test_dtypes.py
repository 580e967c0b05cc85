"""The dtype and device matrix: float32, bfloat16 and float16 bases with float32 and bfloat16 adapters.

Every method (LoRA, IA3, AdaLoRA, a LoRA+IA3 stack and the three soft prompts) runs forward, one training
step and, where it can, merge and unmerge in each combination. Outputs are compared with a float32
reference computed from the same weights (the model cast to float32 after the low-precision run).

Tolerances: ``tolerance(*dtypes)`` is 4 machine epsilons of the narrowest dtype a computation involves
(bfloat16 3.1e-2, float16 3.9e-3; float32 1e-5, for rounding accumulated over the model's ops), times the
largest magnitude of the reference (``scaled``). Observed errors are about a third of that.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import peft
import pytest
import torch
from peft_adalora import AdaLoraConfig
from peft_core import PeftError, PeftModel, get_peft_model, stack
from peft_core.layer import Adapter
from peft_core.soft_prompt import SoftPrompt
from peft_core.testing import tiny_model
from peft_core.testing.training import train_steps
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from peft_p_tuning import PromptEncoderConfig
from peft_prefix_tuning import PrefixTuningConfig
from peft_prompt_tuning import PromptTuningConfig
from safetensors.torch import load_file

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
BASES = [F32, BF16, F16]
ADAPTER_DTYPES = [F32, BF16]
TARGETS = ["q_proj", "v_proj", "down_proj"]

LAYER_METHODS: dict[str, Callable[[], object]] = {
    "lora": lambda: LoraConfig(r=4, target_modules=TARGETS),
    "ia3": lambda: IA3Config(),
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS),
    "lora+ia3": lambda: stack([LoraConfig(r=4, target_modules=TARGETS), IA3Config()]),
}
PROMPT_METHODS: dict[str, Callable[[], object]] = {
    "prompt-tuning": lambda: PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix-tuning": lambda: PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "p-tuning": lambda: PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", encoder_hidden_size=16),
}
METHODS = {**LAYER_METHODS, **PROMPT_METHODS}


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tolerance(*dtypes: torch.dtype) -> float:
    narrowest = max(torch.finfo(d).eps for d in dtypes)
    return 1e-5 if narrowest <= torch.finfo(F32).eps else 4 * narrowest


def scaled(reference: torch.Tensor, *dtypes: torch.dtype) -> float:
    return tolerance(*dtypes) * reference.abs().max().item()


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def cast_adapters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every adapter and soft prompt ``dtype``: the matrix's cells the library's options do not build
    (bfloat16 adapters on a float32 or float16 base, bfloat16 soft prompts)."""
    for module in model.modules():
        if isinstance(module, (Adapter, SoftPrompt)):
            module.to(dtype)


def build(llama_dir, method: str, base_dtype: torch.dtype, adapter_dtype: torch.dtype) -> PeftModel:
    torch.manual_seed(0)
    base = tiny_model("llama", llama_dir, dtype=base_dtype)
    model = get_peft_model(base, METHODS[method](), autocast_adapter_dtype=adapter_dtype == F32)
    cast_adapters(model, adapter_dtype)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # away from the identity inits (B = 0, E = 0, IA3 = 1), so every adapter matters
        for param in trainable(model).values():
            param.add_((0.1 * torch.randn(param.shape, generator=generator)).to(param.dtype))
    return model.eval()


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


matrix = pytest.mark.parametrize(
    "base_dtype, adapter_dtype", [(b, a) for b in BASES for a in ADAPTER_DTYPES],
    ids=[f"base-{name_of(b)}-adapters-{name_of(a)}" for b in BASES for a in ADAPTER_DTYPES],
)


# --- the matrix --------------------------------------------------------------------------------------


@matrix
@pytest.mark.parametrize("method", METHODS)
def test_forward_matches_a_float32_reference(llama_dir, input_ids, method, base_dtype, adapter_dtype):
    model = build(llama_dir, method, base_dtype, adapter_dtype)
    assert {p.dtype for p in trainable(model).values()} == {adapter_dtype}
    low = logits(model, input_ids)
    with model.disable_adapter():
        plain = logits(model, input_ids)
    assert low.dtype == base_dtype
    assert torch.isfinite(low).all()
    model.float()
    reference = logits(model, input_ids)
    atol = scaled(reference, base_dtype, adapter_dtype)
    torch.testing.assert_close(low.float(), reference, rtol=0, atol=atol)
    # The adapters move the output by more than the tolerance, so one the forward dropped would show.
    assert (reference[:, -input_ids.shape[1]:] - plain.float()).abs().max() > 2 * atol


@matrix
@pytest.mark.parametrize("method", METHODS)
def test_a_training_step_changes_only_adapters_and_keeps_their_dtype(
    llama_dir, input_ids, method, base_dtype, adapter_dtype
):
    model = build(llama_dir, method, base_dtype, adapter_dtype)
    trained = trainable(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    (loss,) = train_steps(model, input_ids, steps=1, lr=1e-2)
    assert math.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.dtype == before[name].dtype, name
        if name in trained:
            assert torch.isfinite(param).all(), name
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} is not an adapter tensor but changed"


@matrix
@pytest.mark.parametrize("method", LAYER_METHODS)
def test_merge_then_unmerge_restores_the_model(llama_dir, input_ids, method, base_dtype, adapter_dtype):
    model = build(llama_dir, method, base_dtype, adapter_dtype)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    unmerged = logits(model, input_ids).float()
    model.merge_adapter()
    merged = logits(model, input_ids).float()
    model.unmerge_adapter()
    restored = logits(model, input_ids).float()
    atol = scaled(unmerged, base_dtype, adapter_dtype)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=atol)
    torch.testing.assert_close(restored, unmerged, rtol=0, atol=atol)
    for name, param in model.named_parameters():
        if name in frozen:  # merging rounds to the base's dtype, so unmerging gives the weight back to ~1 ulp
            assert param.dtype == frozen[name].dtype
            torch.testing.assert_close(param, frozen[name], rtol=0, atol=scaled(frozen[name], base_dtype))


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_soft_prompts_refuse_to_merge_in_any_dtype(llama_dir, input_ids, method):
    model = build(llama_dir, method, F16, BF16)
    before = logits(model, input_ids)
    with pytest.raises(PeftError, match="cannot be merged"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)


# --- autocast ------------------------------------------------------------------------------------------


def loss_and_grads(model: PeftModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {}
    for name, param in trainable(model).items():
        grads[name], param.grad = param.grad, None
    model.eval()
    return loss.detach(), grads


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_autocast_matches_float32(llama_dir, input_ids, method):
    model = build(llama_dir, method, F32, F32)
    reference = logits(model, input_ids)
    with torch.autocast("cpu", dtype=BF16):
        low = logits(model, input_ids)
    torch.testing.assert_close(low.float(), reference, rtol=0, atol=scaled(reference, BF16))

    loss, grads = loss_and_grads(model, input_ids)
    with torch.autocast("cpu", dtype=BF16):
        low_loss, low_grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(low_loss.float(), loss, rtol=tolerance(BF16), atol=0)
    for name, grad in grads.items():
        assert low_grads[name].dtype == F32, name  # autocast computes in bfloat16, the weights stay float32
        torch.testing.assert_close(low_grads[name], grad, rtol=0, atol=scaled(grad, BF16), msg=name)

    before = {name: p.detach().clone() for name, p in trainable(model).items()}
    with torch.autocast("cpu", dtype=BF16):
        train_steps(model, input_ids, steps=1, lr=1e-2)
    for name, param in trainable(model).items():
        assert param.dtype == F32 and torch.isfinite(param).all(), name
        assert not torch.equal(param, before[name]), f"{name} did not train under autocast"


# --- the autocast_adapter_dtype option -----------------------------------------------------------------


def hf_config(method: str) -> object:
    return {
        "lora": lambda: peft.LoraConfig(r=4, target_modules=TARGETS),
        "ia3": lambda: peft.IA3Config(),
        "prompt-tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    }[method]()


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("base_dtype", BASES, ids=name_of)
@pytest.mark.parametrize("method", ["lora", "ia3", "prompt-tuning"])
def test_autocast_adapter_dtype_gives_the_dtypes_hf_peft_gives(llama_dir, method, base_dtype, autocast):
    ours = get_peft_model(tiny_model("llama", llama_dir, dtype=base_dtype), METHODS[method](),
                          autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(tiny_model("llama", llama_dir, dtype=base_dtype), hf_config(method),
                                 autocast_adapter_dtype=autocast)
    dtypes = {p.dtype for p in trainable(ours).values()}
    assert dtypes == {p.dtype for p in trainable(theirs).values()}
    if method in LAYER_METHODS:  # True upcasts half-precision layers' adapters; False keeps the layer's dtype
        assert dtypes == {F32 if autocast else base_dtype}
    else:  # soft prompts are float32 either way, as in Hugging Face PEFT
        assert dtypes == {F32}


def test_loading_takes_autocast_adapter_dtype(llama_dir, tmp_path):
    build(llama_dir, "lora", F32, F32).save_pretrained(tmp_path)

    def adapter_dtypes(model: PeftModel, name: str) -> set[torch.dtype]:
        return {p.dtype for n, p in model.named_parameters() if f".{name}." in n}

    upcast = PeftModel.from_pretrained(tiny_model("llama", llama_dir, dtype=BF16), tmp_path)
    assert adapter_dtypes(upcast, "default") == {F32}
    kept = PeftModel.from_pretrained(tiny_model("llama", llama_dir, dtype=BF16), tmp_path, autocast_adapter_dtype=False)
    assert adapter_dtypes(kept, "default") == {BF16}
    kept.load_adapter(tmp_path, "second")
    kept.load_adapter(tmp_path, "third", autocast_adapter_dtype=False)
    assert adapter_dtypes(kept, "second") == {F32}
    assert adapter_dtypes(kept, "third") == {BF16}

    kept.set_adapter(["default", "third"])
    kept.save_pretrained(tmp_path / "stack")  # a stack: from_pretrained loads both, each with the option
    stacked = PeftModel.from_pretrained(
        tiny_model("llama", llama_dir, dtype=BF16), tmp_path / "stack", autocast_adapter_dtype=False
    )
    assert stacked.active_adapters == ["default", "third"]
    assert adapter_dtypes(stacked, "default") == adapter_dtypes(stacked, "third") == {BF16}


# --- loading across dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("saved, loaded", [(BF16, F32), (F32, BF16)], ids=["bf16-into-f32", "f32-into-bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_saved_in_one_dtype_loads_into_a_base_of_another(
    llama_dir, input_ids, tmp_path, method, saved, loaded
):
    source = build(llama_dir, method, saved, saved)
    source.save_pretrained(tmp_path)
    target = PeftModel.from_pretrained(tiny_model("llama", llama_dir, dtype=loaded), tmp_path,
                                       autocast_adapter_dtype=False)
    assert target.active_adapters == source.active_adapters  # a stack loads whole
    live_dtype = loaded if method in LAYER_METHODS else F32  # soft prompts are built float32
    for name in target.active_adapters:
        values = load_file(tmp_path / ("" if name == "default" else name) / "adapter_model.safetensors")
        assert {v.dtype for v in values.values()} == {saved}
        live = target._adapter_tensors(name)
        assert live.keys() == values.keys()
        for key, tensor in live.items():
            assert tensor.dtype == live_dtype, key
            # Cast to the live dtype on load: exact for an upcast, rounded to nearest for a downcast.
            torch.testing.assert_close(tensor, values[key].to(live_dtype), rtol=0, atol=0, msg=key)
            if live_dtype.itemsize >= saved.itemsize:
                assert torch.equal(tensor.to(saved), values[key]), key
    expected = logits(source, input_ids).float()
    torch.testing.assert_close(logits(target, input_ids).float(), expected, rtol=0,
                               atol=scaled(expected, saved, loaded))


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_hf_peft_loads_what_we_save_from_a_bfloat16_base(llama_dir, input_ids, tmp_path, autocast):
    ours = build(llama_dir, "lora", BF16, F32 if autocast else BF16)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama", llama_dir, dtype=BF16), tmp_path,
                                            autocast_adapter_dtype=autocast).eval()
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == \
        {p.dtype for p in trainable(ours).values()}
    expected = logits(ours, input_ids).float()
    torch.testing.assert_close(logits(theirs, input_ids).float(), expected, rtol=0, atol=scaled(expected, BF16))


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_we_load_what_hf_peft_saves_from_a_bfloat16_base(llama_dir, input_ids, tmp_path, autocast):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_model("llama", llama_dir, dtype=BF16), config,
                                 autocast_adapter_dtype=autocast).eval()
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model("llama", llama_dir, dtype=BF16), tmp_path,
                                     autocast_adapter_dtype=autocast)
    assert {p.dtype for p in ours.parameters() if p.dtype != BF16} <= {F32}
    assert {p.dtype for n, p in ours.named_parameters() if ".adapters." in n} == \
        {p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    expected = logits(theirs, input_ids).float()
    torch.testing.assert_close(logits(ours, input_ids).float(), expected, rtol=0, atol=scaled(expected, BF16))


# --- moving the model ----------------------------------------------------------------------------------


@pytest.fixture
def every_kind(llama_dir) -> PeftModel:
    """A float32 model holding one adapter of each method (the p-tuning one with its encoder)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", llama_dir), LAYER_METHODS["lora"](), "lora")
    for name in ["ia3", "adalora", *PROMPT_METHODS]:
        model.add_adapter(name, METHODS[name]())
    return model.eval()


MOVES: dict[str, tuple[Callable[[torch.nn.Module], object], Callable[[torch.Tensor], bool]]] = {
    "to-float64": (lambda m: m.to(torch.float64), lambda t: t.dtype == torch.float64),
    "half": (lambda m: m.half(), lambda t: t.dtype == F16),
    "bfloat16": (lambda m: m.bfloat16(), lambda t: t.dtype == BF16),
    "to-meta": (lambda m: m.to("meta"), lambda t: t.is_meta),
}


@pytest.mark.parametrize("move", MOVES)
def test_moving_the_model_moves_every_adapter_tensor(every_kind, move):
    apply, moved = MOVES[move]
    trained = set(trainable(every_kind))
    adapters = {n for n, _ in every_kind.named_parameters() if ".adapters." in n or "peft_soft_prompts." in n}
    assert {n for n in adapters if "peft_soft_prompts.p-tuning.encoder" in n}  # the encoder is among them
    apply(every_kind)
    tensors = [*every_kind.named_parameters(), *every_kind.named_buffers()]
    assert adapters <= {n for n, _ in tensors}
    for name, tensor in tensors:
        if tensor.is_floating_point() or move == "to-meta":
            assert moved(tensor), f"{name} stayed {tensor.dtype} on {tensor.device}"
    assert set(trainable(every_kind)) == trained


@pytest.mark.parametrize("method", METHODS)
def test_outputs_survive_a_dtype_round_trip(llama_dir, input_ids, method):
    model = build(llama_dir, method, F32, F32)
    before = logits(model, input_ids)
    model.to(torch.float64)
    wide = logits(model, input_ids)
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, before.double(), rtol=0, atol=scaled(before, F32))
    model.to(F32)  # float32 -> float64 -> float32 is exact, so the outputs are the same bits
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)
    model.half()
    half = logits(model, input_ids)
    assert half.dtype == F16
    model.float()
    torch.testing.assert_close(half.float(), before, rtol=0, atol=scaled(before, F16))
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=scaled(before, F16))


def test_mixed_batches_use_the_current_weights_after_moves_and_training(llama_dir):
    """A mixed batch derives stacked LoRA factors from the weights and keeps them: a dtype move, a training
    step and a round trip through bfloat16 must each show in its outputs."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", llama_dir), LoraConfig(r=4, target_modules=TARGETS,
                                                                      init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("ia3", IA3Config())
    names = ["a", "__base__", "b", "ia3"]
    input_ids = torch.randint(2, 128, (len(names), 6), generator=torch.Generator().manual_seed(3))

    def check(atol: float) -> None:
        model.eval()
        with torch.no_grad():
            mixed = model(input_ids, adapter_names=names).logits
            for row, name in enumerate(names):
                if name == "__base__":
                    with model.disable_adapter():
                        alone = model(input_ids[row : row + 1]).logits
                else:
                    model.set_adapter(name)
                    alone = model(input_ids[row : row + 1]).logits
                torch.testing.assert_close(mixed[row : row + 1], alone, rtol=0, atol=atol, msg=name)

    check(1e-5)  # builds the stacked factors
    model.to(torch.float64)
    check(1e-12)
    model.set_adapter("a")
    train_steps(model, input_ids, steps=1, lr=1e-2)
    check(1e-12)
    model.to(BF16).to(F32)  # back to float32, with weights rounded to bfloat16
    check(1e-5)
    model.to("meta")
    with torch.no_grad():
        assert model(input_ids.to("meta"), adapter_names=names).logits.is_meta
