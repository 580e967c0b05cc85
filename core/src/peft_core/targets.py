"""Default target modules by model family: one table of data that every layer method reads.

A config with ``target_modules=None`` adapts the layers its method's *role* names for the model's family.
The roles of the installed methods:

- ``"attention"``: the query and value projections (LoRA, QLoRA, AdaLoRA), as in Hugging Face PEFT;
- ``"ia3"``: the keys, the values and the feed-forward output (IA3);
- ``"feedforward"``: which of the ``"ia3"`` layers are feed-forward layers (IA3 scales their input).

A family is a transformers ``model_type`` (``"llama"``; for a multimodal model, also its text model's,
``"gemma3_text"``) or, for models without one (diffusers), a class name of the model. Third-party plugins
add families, or roles for their own methods, with the ``peft_default_targets`` hook; their entries
replace the built-in ones for the same family and role.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_core.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

# family -> role -> module names (suffixes, as target_modules takes them).
_LLAMA_LIKE = {
    "attention": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"],
}
_BERT_LIKE = {
    "attention": ["query", "value"], "ia3": ["key", "value", "output.dense"], "feedforward": ["output.dense"],
}
_FUSED_QKV = {
    "attention": ["query_key_value"], "ia3": ["query_key_value", "dense_4h_to_h"], "feedforward": ["dense_4h_to_h"],
}
_PROJ_FC2 = {"attention": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "fc2"], "feedforward": ["fc2"]}
# transformers 5 names ViT's projections like Llama's (q_proj, ..., mlp.fc2); earlier releases like BERT's.
_VIT_LIKE = {
    "attention": ["query", "value", "q_proj", "v_proj"],
    "ia3": ["key", "value", "output.dense", "k_proj", "v_proj", "fc2"], "feedforward": ["output.dense", "fc2"],
}
_T5_LIKE = {"attention": ["q", "v"], "ia3": ["k", "v", "wo"], "feedforward": ["wo"]}
_DIFFUSERS_ATTENTION = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"], "ia3": ["to_k", "to_v", "ff.net.2"], "feedforward": ["ff.net.2"],
}

# Families share these dicts; nothing mutates them (targets_table copies).
BUILTIN_TARGETS: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
         "olmo", "olmo2", "granite", "stablelm", "cohere", "starcoder2"),
        _LLAMA_LIKE,
    ),
    "phi3": {"attention": ["qkv_proj"], "ia3": ["qkv_proj", "down_proj"], "feedforward": ["down_proj"]},
    "phi": _PROJ_FC2,
    "gpt2": {"attention": ["c_attn"], "ia3": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]},
    "gpt_bigcode": {"attention": ["c_attn"], "ia3": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]},
    "gpt_neox": _FUSED_QKV, "falcon": _FUSED_QKV, "bloom": _FUSED_QKV,
    "gptj": {"attention": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "fc_out"], "feedforward": ["fc_out"]},
    "gpt_neo": {
        "attention": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "mlp.c_proj"], "feedforward": ["mlp.c_proj"],
    },
    "opt": _PROJ_FC2, "bart": _PROJ_FC2, "mbart": _PROJ_FC2, "whisper": _PROJ_FC2,
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT_LIKE),
    **dict.fromkeys(("vit", "deit"), _VIT_LIKE),
    "distilbert": {"attention": ["q_lin", "v_lin"], "ia3": ["k_lin", "v_lin", "lin2"], "feedforward": ["lin2"]},
    "deberta-v2": {
        "attention": ["query_proj", "value_proj"], "ia3": ["key_proj", "value_proj", "output.dense"],
        "feedforward": ["output.dense"],
    },
    **dict.fromkeys(("t5", "mt5"), _T5_LIKE),
    **dict.fromkeys(
        ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "Transformer2DModel"),
        _DIFFUSERS_ATTENTION,
    ),
}


def targets_table() -> dict[str, dict[str, list[str]]]:
    """The built-in table with every installed plugin's ``peft_default_targets`` entries on top."""
    from peft_core.plugins import registry

    table = {family: dict(roles) for family, roles in BUILTIN_TARGETS.items()}

    def register(family: str, role: str, module_names: list[str]) -> None:
        if not isinstance(module_names, list) or not all(isinstance(n, str) for n in module_names):
            raise ConfigError(f"peft_default_targets: {family!r} / {role!r} needs a list of module names.")
        table.setdefault(family, {})[role] = list(module_names)

    registry().hook.peft_default_targets(register=register)
    return table


def model_families(model: nn.Module) -> list[str]:
    """The names ``model`` may be listed under, most specific first: its ``model_type``, its text model's
    ``model_type``, then the names of its classes."""
    names = []
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str):
        names.append(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if isinstance(getattr(text, "model_type", None), str):
        names.append(text.model_type)
    names.extend(cls.__name__ for cls in type(model).__mro__)
    return list(dict.fromkeys(names))


def default_targets(model: nn.Module, role: str, owner: str = "target_modules") -> list[str]:
    """The module names ``role`` adapts by default on ``model``'s family.

    Raises :class:`ConfigError` for a family the table does not know, listing the model's Linear-like
    layers to choose ``target_modules`` from.
    """
    table = targets_table()
    for family in model_families(model):
        if role in table.get(family, {}):
            return list(table[family][role])
    from peft_core.walk import linear_like_names

    family = model_families(model)[0]
    raise ConfigError(
        f"{owner} is None and there is no default for a {family!r} model (role {role!r}). Name the layers to adapt: "
        f"its Linear-like layers are {', '.join(linear_like_names(model)) or 'none'} (e.g. target_modules=['q_proj', "
        f"'v_proj']), or use target_modules='all-linear'. A plugin can add defaults for this family with the "
        f"peft_default_targets hook."
    )
