"""LoRA's default target modules by model family, as Hugging Face PEFT defines them: the query and value
projections (role ``"attention"``, which AdaLoRA and QLoRA read too). The plugin adds them to the core's
table through ``peft_default_targets``."""

from __future__ import annotations

_QV = ["q_proj", "v_proj"]
_FUSED = ["query_key_value"]
_BERT = ["query", "value"]
# transformers 5 names ViT's projections like Llama's; earlier releases like BERT's.
_VIT = ["query", "value", "q_proj", "v_proj"]
_T5 = ["q", "v"]
_DIFFUSERS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
         "olmo", "olmo2", "granite", "stablelm", "cohere", "starcoder2", "phi", "gptj", "gpt_neo", "opt", "bart",
         "mbart", "whisper"),
        _QV,
    ),
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"],
    **dict.fromkeys(("gpt_neox", "falcon", "bloom"), _FUSED),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    **dict.fromkeys(("vit", "deit"), _VIT),
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    **dict.fromkeys(("t5", "mt5"), _T5),
    **dict.fromkeys(
        ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "Transformer2DModel"), _DIFFUSERS
    ),
}
