"""Quantized base layers: bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` in place of ``nn.Linear``.

``read_quantized`` / ``write_quantized`` dequantize and re-quantize their weights; the plugin registers
them with the core when it is discovered, so merging, DoRA and PiSSA work on these layers unchanged,
however the model was quantized.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from peft_core.errors import ConfigError, PluginError
from peft_core.walk import iter_modules, matches, output_head, replace_module
from torch import nn

if TYPE_CHECKING:
    from peft_qlora.config import QLoraConfig

MIN_BITSANDBYTES = "0.45.0"


def import_bitsandbytes() -> Any:
    """bitsandbytes, or a :class:`PluginError` that says what to install."""
    from packaging.version import Version

    try:
        import bitsandbytes
    except ImportError as exc:
        raise PluginError(
            f"QLoRA quantizes with bitsandbytes, which is not installed: pip install 'bitsandbytes>={MIN_BITSANDBYTES}'"
        ) from exc
    if Version(bitsandbytes.__version__) < Version(MIN_BITSANDBYTES):
        raise PluginError(
            f"QLoRA needs bitsandbytes >= {MIN_BITSANDBYTES}, found {bitsandbytes.__version__}: "
            f"pip install --upgrade 'bitsandbytes>={MIN_BITSANDBYTES}'"
        )
    return bitsandbytes


def _is_quantized(module: nn.Module, bnb: Any) -> bool:
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantize_model(model: nn.Module, config: QLoraConfig) -> nn.Module:
    """Replace the model's ``nn.Linear`` (and GPT-2 ``Conv1D``) layers by quantized ones, in place; return
    the model.

    The output head, ``config.skip_modules`` and ``config.modules_to_save`` stay in full precision. A
    model that is already quantized (by this function or by transformers' ``BitsAndBytesConfig``) is left as
    it is, after checking it has the number of bits the config asks for.
    """
    bnb = import_bitsandbytes()
    already = {4 if isinstance(m, bnb.nn.Linear4bit) else 8 for m in model.modules() if _is_quantized(m, bnb)}
    if already:
        if already != {config.bits}:
            raise ConfigError(
                f"The model is already quantized to {sorted(already)} bits but the config asks for "
                f"{config.bits}. Set QLoraConfig(bits={min(already)}) or start from an unquantized model."
            )
        return model
    head = output_head(model)
    dtype = getattr(torch, config.compute_dtype) if config.compute_dtype else None
    # Modules trained in full (a classifier head) stay in full precision, as transformers keeps them.
    keep = [*(config.skip_modules or []), *(config.modules_to_save or [])]
    for name, module in list(iter_modules(model)):
        linear = _as_linear(module)
        if linear is None or module is head or (keep and _inside(name, keep)):
            continue
        if module.weight.is_meta:
            raise ConfigError(f"'{name}' has no weights (it is on the meta device); load the model before quantizing.")
        replace_module(model, name, quantize_linear(linear, config, dtype or module.weight.dtype, bnb))
    return model


def _inside(name: str, patterns: list[str]) -> bool:
    """Whether the module ``name`` or one it belongs to matches (RoBERTa's classifier head holds two Linears)."""
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` as an ``nn.Linear`` if it is one, or GPT-2's ``Conv1D`` (the same map, weight stored
    transposed) turned into one; None for anything else."""
    if type(module) is nn.Linear:
        return module
    if type(module).__name__ != "Conv1D" or not type(module).__module__.startswith("transformers"):
        return None
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def quantize_linear(linear: nn.Linear, config: QLoraConfig, compute_dtype: torch.dtype, bnb: Any) -> nn.Module:
    device = linear.weight.device
    if config.bits == 4:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
            compress_statistics=config.double_quant, quant_type=config.quant_type, device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=config.double_quant,
            quant_type=config.quant_type, module=layer,
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer.train(linear.training)
    return layer.to(device)  # bitsandbytes quantizes a weight when it is first moved to a device


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized Linear (inside adapter wrappers too) by an ``nn.Linear``; return the model.

    Dequantize before ``merge_and_unload()`` to get a full-precision merged model; merging on the
    quantized base re-quantizes the merged weights instead.
    """
    bnb = import_bitsandbytes()
    for name, module in list(model.named_modules()):
        if not _is_quantized(module, bnb):
            continue
        weight = read_quantized(module)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        linear.train(module.training)
        replace_module(model, name, linear)
    return model


def read_quantized(layer: nn.Module) -> torch.Tensor:
    bnb = import_bitsandbytes()
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU kernel on the first inference call (and
            # records bfloat16); unpack a copy, as its own state_dict does, leaving the layer as it is.
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state)
    # 8-bit: int8 rows with one absmax scale each; after the first forward the scales live in layer.state
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)


def write_quantized(layer: nn.Module, dense: torch.Tensor) -> None:
    bnb = import_bitsandbytes()
    old = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        new = bnb.nn.Params4bit(
            dense.to(old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage, module=layer,
        )
    else:
        if old.CB is None and layer.state.CB is not None:
            # The first forward moved the int8 rows and scales into layer.state, where the new weight's will
            # replace them; give them back to the old weight, so putting it back (unmerging) restores them.
            old.CB, old.SCB = layer.state.CB, layer.state.SCB
        new = bnb.nn.Int8Params(dense.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    layer.weight = new.to(old.device)
