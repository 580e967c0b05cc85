"""LoRA on diffusers denoisers (a UNet, an SD3 transformer) and the diffusers LoRA format, both ways.

Every model is built from a config with a fixed seed; nothing is downloaded. diffusers' own loaders
(``pipeline.load_lora_weights``, ``ModelMixin.load_lora_adapter``) and writer (``save_lora_weights``, with
a LoRA that Hugging Face PEFT adds) are the references the conversions are checked against.
"""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import safetensors
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from peft_core import AdapterLayer, AdapterLoadError, PeftError, PeftModel, get_peft_model
from peft_lora import LoraConfig
from peft_lora.diffusers import (
    LORA_WEIGHT_NAME,
    METADATA_KEY,
    diffusers_lora_state_dict,
    load_diffusers_lora,
    save_diffusers_lora,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations" / "diffusers.md"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
TEXT_TARGETS = ["token_embedding", "q_proj", "k_proj", "v_proj", "out_proj"]  # an nn.Embedding too
LETTERS = list(string.ascii_lowercase)


# --- tiny models ----------------------------------------------------------------------------------


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
    )


def unet_inputs(seed: int = 5) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 700]),
            torch.randn(2, 5, 16, generator=generator))


def sd3_inputs(seed: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=generator),
            "encoder_hidden_states": torch.randn(2, 5, 16, generator=generator),
            "pooled_projections": torch.randn(2, 8, generator=generator), "timestep": torch.tensor([10, 700])}


# The two denoisers behind one interface: build, call, what the LoRA targets.
DENOISERS = {
    "unet": (tiny_unet, lambda m, inputs: m(*inputs).sample, unet_inputs, UNET_TARGETS),
    "sd3": (tiny_sd3, lambda m, inputs: m(**inputs).sample, sd3_inputs, SD3_TARGETS),
}


def run(model: nn.Module, kind: str, seed: int = 5) -> torch.Tensor:
    _, call, inputs, _ = DENOISERS[kind]
    with torch.no_grad():
        return call(model, inputs(seed))


def perturbed_lora(kind: str, **config: object) -> PeftModel:
    """A LoRA with random A and B, so that it changes the outputs as a trained one would."""
    build, _, _, targets = DENOISERS[kind]
    model = get_peft_model(build(), LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets,
                                                   "init_lora_weights": False, **config}))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)  # large enough that a wrong scaling shows
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    """A CLIP tokenizer over single letters, written locally (vocab.json and an empty merges.txt)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *[f"{c}</w>" for c in LETTERS]]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def tiny_text_encoder(seed: int = 1) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=2 + 2 * len(LETTERS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def tiny_pipeline(tokenizer: CLIPTokenizer, unet: nn.Module | None = None,
                  text_encoder: nn.Module | None = None) -> StableDiffusionPipeline:
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=8,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder or tiny_text_encoder(), tokenizer=tokenizer, unet=unet or tiny_unet(),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def suffix_matches(model: nn.Module, targets: list[str]) -> list[str]:
    return [n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]


# --- LoRA on the denoisers ------------------------------------------------------------------------


def test_lora_adapts_exactly_the_unet_layers_asked_for():
    model = get_peft_model(tiny_unet(), LoraConfig(r=4, target_modules=UNET_TARGETS))
    expected = suffix_matches(tiny_unet(), UNET_TARGETS)
    assert model.injected_modules("default") == expected
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)}
    assert sorted(layers) == sorted(expected)
    convs = [n for n, m in layers.items() if isinstance(m.base_layer, nn.Conv2d)]
    linears = [n for n, m in layers.items() if isinstance(m.base_layer, nn.Linear)]
    # 4 attention blocks (down, mid, 2 up) x 2 attentions x 4 projections; 8 resnets x 2 convolutions.
    assert (len(linears), len(convs)) == (32, 16)
    assert all(n.endswith(("conv1", "conv2")) for n in convs)
    conv = layers["down_blocks.0.resnets.0.conv1"].adapters["default"]
    assert tuple(conv.lora_A.weight.shape) == (4, 8, 3, 3) and tuple(conv.lora_B.weight.shape) == (8, 4, 1, 1)
    # The wrapper reads the UNet's attributes through.
    assert (model.config.in_channels, model.dtype, model.device.type) == (4, torch.float32, "cpu")
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    # B starts at zero: the UNet computes what it computed before.
    torch.testing.assert_close(run(model, "unet"), run(tiny_unet(), "unet"), rtol=0, atol=0)


def test_lora_adapts_exactly_the_sd3_transformer_layers_asked_for():
    model = get_peft_model(tiny_sd3(), LoraConfig(r=4, target_modules=SD3_TARGETS))
    expected = suffix_matches(tiny_sd3(), SD3_TARGETS)
    assert model.injected_modules("default") == expected
    # Two joint blocks with all four image projections; the last block has no text output, but its text
    # stream still projects q, k and v: 2 * 4 + 2 * 3.
    assert len(expected) == 14
    assert all(isinstance(m.base_layer, nn.Linear) for m in model.modules() if isinstance(m, AdapterLayer))
    torch.testing.assert_close(run(model, "sd3"), run(tiny_sd3(), "sd3"), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_training_on_latents_lowers_the_loss_and_changes_only_lora(kind):
    build, call, inputs, targets = DENOISERS[kind]
    base = build()
    if kind == "unet":
        base.enable_gradient_checkpointing()  # with a frozen base, gradients must still reach the adapters
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs(11)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12))  # the target
    model.train()
    losses = []
    for _ in range(6):
        loss = nn.functional.mse_loss(call(model, batch), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n in before if ".lora_A." in n or ".lora_B." in n}
    # The last SD3 block drops its text stream, so that block's text query feeds no output and gets no gradient.
    dead = {n for n in lora if kind == "sd3" and "transformer_blocks.1.attn.add_q_proj" in n}
    assert len(dead) == (2 if kind == "sd3" else 0)
    assert changed == lora - dead  # every factor trained (A once B left zero), nothing else moved
    for name in before.keys() - lora:
        torch.testing.assert_close(dict(model.named_parameters())[name], before[name], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_save_and_load_round_trip_gives_the_same_outputs(kind, tmp_path):
    model = perturbed_lora(kind)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(DENOISERS[kind][0](), tmp_path)
    expected = run(model, kind)
    torch.testing.assert_close(run(loaded, kind), expected, rtol=0, atol=0)
    assert (run(loaded, kind) - run(DENOISERS[kind][0](), kind)).abs().max() > 1e-2  # the LoRA matters


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_merge_unmerge_and_merge_and_unload(kind):
    model = perturbed_lora(kind)
    base = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if ".adapters." not in n}
    unmerged = run(model, kind)
    model.merge_adapter()
    torch.testing.assert_close(run(model, kind), unmerged, rtol=1e-4, atol=1e-5)
    live = dict(model.get_base_model().named_parameters())
    assert any(not torch.equal(live[n], base[n]) for n in base)  # the merge did write the weights
    model.unmerge_adapter()
    live = dict(model.get_base_model().named_parameters())
    for name, weight in base.items():
        torch.testing.assert_close(live[name], weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model, kind), unmerged, rtol=1e-5, atol=1e-6)
    plain = model.merge_and_unload()
    assert isinstance(plain, type(DENOISERS[kind][0]()))
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(run(plain, kind), unmerged, rtol=1e-4, atol=1e-5)


# --- our LoRA into diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {},
    {"use_dora": True, "use_rslora": True, "rank_pattern": {"conv1": 2}, "alpha_pattern": {"to_v": 3}},
], ids=["lora", "dora-rslora-patterns"])
def test_exported_unet_lora_loads_into_a_diffusers_pipeline(options, tokenizer, tmp_path):
    model = perturbed_lora("unet", **options)
    path = save_diffusers_lora(model, tmp_path)
    assert Path(path).name == LORA_WEIGHT_NAME
    with safetensors.safe_open(path, "pt") as f:
        keys, metadata = list(f.keys()), json.loads(f.metadata()[METADATA_KEY])
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert all(k.startswith("unet.") for k in keys) and metadata["unet.r"] == 4

    pipe = tiny_pipeline(tokenizer)
    pipe.load_lora_weights(tmp_path)
    expected = run(model, "unet")
    torch.testing.assert_close(run(pipe.unet, "unet"), expected, rtol=1e-5, atol=1e-5)
    assert (expected - run(tiny_unet(), "unet")).abs().max() > 1e-2
    # And back: our reader gives the same model.
    torch.testing.assert_close(run(load_diffusers_lora(tiny_unet(), tmp_path), "unet"), expected, rtol=0, atol=0)


def test_unet_and_text_encoder_loras_in_one_file_generate_the_same_images(tokenizer, tmp_path):
    unet = perturbed_lora("unet")
    text = get_peft_model(tiny_text_encoder(), LoraConfig(r=2, lora_alpha=6, target_modules=TEXT_TARGETS,
                                                          init_lora_weights=False))
    with torch.no_grad():
        for name, param in text.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # the ones that start at zero
                param.normal_(0, 0.5)
    save_diffusers_lora({"unet": unet, "text_encoder": text}, tmp_path)

    loaded = tiny_pipeline(tokenizer)
    loaded.load_lora_weights(tmp_path)
    ids = tokenizer("a cat", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        states = text(input_ids=ids)[0]
        torch.testing.assert_close(loaded.text_encoder(ids)[0], states, rtol=1e-5, atol=1e-5)
        assert (states - tiny_text_encoder()(ids)[0]).abs().max() > 1e-2
    # Our unmerged adapters run inside a pipeline too: the wrapped models are the diffusers/transformers classes.
    ours = tiny_pipeline(tokenizer, unet=unet.get_base_model(), text_encoder=text.get_base_model())
    settings = dict(num_inference_steps=2, height=8, width=8, output_type="pt")
    image = loaded("a cat", generator=torch.Generator().manual_seed(0), **settings).images
    torch.testing.assert_close(ours("a cat", generator=torch.Generator().manual_seed(0), **settings).images, image,
                               rtol=1e-4, atol=1e-4)
    plain = tiny_pipeline(tokenizer)("a cat", generator=torch.Generator().manual_seed(0), **settings).images
    assert (plain - image).abs().max() > 1e-3


def test_exported_transformer_lora_loads_with_diffusers_load_lora_adapter(tmp_path):
    model = perturbed_lora("sd3", rank_pattern={"add_q_proj": 2})
    save_diffusers_lora(model, tmp_path, component="transformer")
    theirs = tiny_sd3()
    theirs.load_lora_adapter(str(tmp_path), prefix="transformer", weight_name=LORA_WEIGHT_NAME)
    expected = run(model, "sd3")
    torch.testing.assert_close(run(theirs, "sd3"), expected, rtol=1e-5, atol=1e-5)
    assert (expected - run(tiny_sd3(), "sd3")).abs().max() > 1e-2
    back = load_diffusers_lora(tiny_sd3(), tmp_path, component="transformer")
    torch.testing.assert_close(run(back, "sd3"), expected, rtol=0, atol=0)


# --- diffusers' LoRA into ours --------------------------------------------------------------------


@pytest.mark.parametrize(("with_metadata", "use_rslora"), [(True, False), (True, True), (False, False)],
                         ids=["metadata", "metadata-rslora", "no-metadata"])
def test_lora_written_by_diffusers_loads_with_the_same_outputs(with_metadata, use_rslora, tokenizer, tmp_path):
    source = tiny_pipeline(tokenizer)
    source.unet.add_adapter(peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"], rank_pattern={"conv1": 2},
        init_lora_weights=False, use_rslora=use_rslora,
    ))
    trained = run(source.unet, "unet")
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=peft.get_peft_model_state_dict(source.unet),
        unet_lora_adapter_metadata=source.unet.peft_config["default"].to_dict() if with_metadata else None,
    )
    reference = tiny_pipeline(tokenizer)
    reference.load_lora_weights(tmp_path)
    expected = run(reference.unet, "unet")

    ours = load_diffusers_lora(tiny_unet(), tmp_path)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert len(ours.injected_modules("default")) == 4 * 2 * 4 + 8  # attention projections and conv1s
    torch.testing.assert_close(run(ours, "unet"), expected, rtol=1e-5, atol=1e-5)
    # With metadata alpha / r (or alpha / sqrt(r)) survives; without it diffusers, and so this library, takes
    # scaling 1.
    assert torch.allclose(expected, trained, atol=1e-5) == with_metadata


def test_diffusers_lora_joins_an_existing_peft_model_as_another_adapter(tmp_path):
    exported = perturbed_lora("unet")
    save_diffusers_lora(exported, tmp_path)
    model = get_peft_model(tiny_unet(), LoraConfig(r=2, target_modules=["to_q"]))
    same = load_diffusers_lora(model, tmp_path, adapter_name="style", is_trainable=True)
    assert same is model and model.active_adapters == ["default"]
    model.set_adapter("style")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".style." in n)
    torch.testing.assert_close(run(model, "unet"), run(exported, "unet"), rtol=0, atol=0)


def test_unsupported_files_and_adapters_raise_and_leave_the_model_as_it_was(tmp_path):
    model = perturbed_lora("unet")
    tensors, metadata = diffusers_lora_state_dict(model)
    assert len(tensors) == 2 * 48 and metadata["unet.lora_alpha"] == 8.0
    unet = tiny_unet()
    before = run(unet, "unet")
    with pytest.raises(AdapterLoadError, match=r"no LoRA for the component 'transformer'.*\['unet'\]"):
        load_diffusers_lora(unet, tensors, component="transformer")
    kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8)}
    with pytest.raises(AdapterLoadError, match="no LoRA for the component 'unet'"):
        load_diffusers_lora(unet, kohya)
    old_layout = {"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.zeros(2, 8)}
    with pytest.raises(AdapterLoadError, match="not the PEFT layout"):
        load_diffusers_lora(unet, old_layout)
    # Factors that do not fit: the model gets its layers back.
    wrong = {k: (v[:, :1] if k.endswith("lora_A.weight") else v) for k, v in tensors.items()}
    with pytest.raises(AdapterLoadError, match="does not fit this model"):
        load_diffusers_lora(unet, wrong)
    assert not any(isinstance(m, AdapterLayer) for m in unet.modules())
    torch.testing.assert_close(run(unet, "unet"), before, rtol=0, atol=0)
    with pytest.raises(PeftError, match="cannot hold"):
        save_diffusers_lora(get_peft_model(tiny_unet(), LoraConfig(target_modules=["to_q"], bias="all")), tmp_path)
    assert not (tmp_path / LORA_WEIGHT_NAME).exists()


# --- the docs and the import promise --------------------------------------------------------------


def test_the_docs_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    namespace: dict = {"__name__": "docs.diffusers"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 10 and losses[-1] < 0.9 * losses[0]
    assert isinstance(namespace["unet"], UNet2DConditionModel)
    with open(Path(namespace["work"]) / "diffusers" / LORA_WEIGHT_NAME, "rb") as f:
        assert len(f.read()) > 10_000


def test_importing_the_format_and_discovering_plugins_leaves_diffusers_unloaded():
    probe = ("import sys, peft_core, peft_lora.diffusers; from peft_core.plugins import registry; "
             "print('diffusers' in registry().formats, *(m in sys.modules for m in ('diffusers', 'safetensors', "
             "'torch')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "False", "False", "False"]
