"""IA3's default target modules by model family, as Hugging Face PEFT defines them: the keys, the values and
the feed-forward output layer (role ``"ia3"``), and which of those are feed-forward layers, whose input IA3
scales (role ``"feedforward"``). The plugin adds them to the core's table through ``peft_default_targets``."""

from __future__ import annotations

# family -> (targets, feed-forward targets)
_LLAMA_LIKE = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_BERT_LIKE = (["key", "value", "output.dense"], ["output.dense"])
_FUSED_QKV = (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])
_PROJ_FC2 = (["k_proj", "v_proj", "fc2"], ["fc2"])
_GPT2_LIKE = (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])
# transformers 5 names ViT's projections like Llama's (q_proj, ..., mlp.fc2); earlier releases like BERT's.
_VIT_LIKE = (["key", "value", "output.dense", "k_proj", "v_proj", "fc2"], ["output.dense", "fc2"])
_T5_LIKE = (["k", "v", "wo"], ["wo"])
_DIFFUSERS = (["to_k", "to_v", "ff.net.2"], ["ff.net.2"])

DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
         "olmo", "olmo2", "granite", "stablelm", "cohere", "starcoder2"),
        _LLAMA_LIKE,
    ),
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    "phi": _PROJ_FC2, "opt": _PROJ_FC2, "bart": _PROJ_FC2, "mbart": _PROJ_FC2, "whisper": _PROJ_FC2,
    "gpt2": _GPT2_LIKE, "gpt_bigcode": _GPT2_LIKE, "gpt_neo": (["k_proj", "v_proj", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": _FUSED_QKV, "falcon": _FUSED_QKV, "bloom": _FUSED_QKV,
    "gptj": (["k_proj", "v_proj", "fc_out"], ["fc_out"]),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT_LIKE),
    **dict.fromkeys(("vit", "deit"), _VIT_LIKE),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    **dict.fromkeys(("t5", "mt5"), _T5_LIKE),
    **dict.fromkeys(
        ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "Transformer2DModel"), _DIFFUSERS
    ),
}
