"""``peft convert`` with the diffusers format the LoRA plugin registers: a saved LoRA to a diffusers file and
back without a model, checked against what the plugin writes from the live model and what the loader accepts."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft_core import PeftError, PeftModel, get_peft_model
from peft_core.cli import main
from peft_core.serialization import read_config_dict, read_weights
from peft_core.testing import strip_checksums
from peft_core.testing.commands import one_line_error, run_peft
from peft_ia3 import IA3Config
from peft_lora import LoraConfig
from peft_lora.diffusers import LORA_WEIGHT_NAME, METADATA_KEY, save_diffusers_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _trained(model: PeftModel) -> PeftModel:
    """Non-zero B factors, so a lost factor or a wrong scaling changes the outputs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model




def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


@pytest.fixture
def unet_adapter(tmp_path) -> tuple[PeftModel, Path]:
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_out.0", "conv1"],
                        rank_pattern={"to_k": 2}, alpha_pattern={"conv1": 3}, use_rslora=True)
    model = _trained(get_peft_model(tiny_unet(), config))
    model.save_pretrained(tmp_path / "peft")
    return model, tmp_path / "peft"


def test_convert_round_trip_without_a_model(capsys, unet_adapter, tmp_path):
    model, peft_dir = unet_adapter
    code, _, _ = run_peft(capsys, "convert", "--to", "diffusers", str(peft_dir), str(tmp_path / "diffusers"))
    assert code == 0
    file = tmp_path / "diffusers" / LORA_WEIGHT_NAME

    # Model-free, the file holds what the library writes from the live model.
    reference = Path(save_diffusers_lora(model, tmp_path / "reference"))
    assert load_file(file).keys() == load_file(reference).keys()
    for key, tensor in load_file(reference).items():
        assert torch.equal(load_file(file)[key], tensor)
    with safe_open(file, "pt") as ours, safe_open(reference, "pt") as theirs:
        assert json.loads(ours.metadata()[METADATA_KEY]) == json.loads(theirs.metadata()[METADATA_KEY])

    code, _, _ = run_peft(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "back"))
    assert code == 0
    original, back = read_weights(peft_dir), read_weights(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert read_config_dict(tmp_path / "back") == read_config_dict(peft_dir)


def test_convert_foreign_diffusers_file_rebuilds_an_equivalent_config(capsys, unet_adapter, tmp_path):
    model, _ = unet_adapter
    # Written by the library from the live model, so it has no copy of the original config.
    save_diffusers_lora(model, tmp_path / "diffusers")
    code, _, _ = run_peft(capsys, "convert", "--to", "peft", str(tmp_path / "diffusers"), str(tmp_path / "back"))
    assert code == 0
    config = read_config_dict(tmp_path / "back")
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False  # folded into the alphas

    sample = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10]),
              torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(2)))
    loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(loaded(*sample).sample, model.eval()(*sample).sample)


def test_convert_errors_are_one_line(capsys, unet_adapter, tmp_path):
    _, peft_dir = unet_adapter
    assert run_peft(capsys, "convert", "--to", "diffusers", str(peft_dir), str(tmp_path / "d"))[0] == 0
    code, _, err = run_peft(capsys, "convert", "--to", "diffusers", str(peft_dir), str(tmp_path / "d"))
    assert code == 1 and "--force" in one_line_error(err, "convert")
    code, _, err = run_peft(capsys, "convert", "--to", "peft", str(tmp_path / "d"), str(tmp_path / "p"),
                        "--component", "transformer")
    assert code == 1 and "unet" in one_line_error(err, "convert")
    (tmp_path / "ia3").mkdir()
    get_peft_model(tiny_unet(), IA3Config(target_modules=["to_q"], feedforward_modules=[])).save_pretrained(
        tmp_path / "ia3")
    code, _, err = run_peft(capsys, "convert", "--to", "diffusers", str(tmp_path / "ia3"), str(tmp_path / "x"))
    assert code == 1 and "IA3" in one_line_error(err, "convert")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--to", "kohya", str(peft_dir), str(tmp_path / "y")])
    assert exit_info.value.code == 2
    assert "(installed: peft, diffusers)" in capsys.readouterr().err
    # A PEFT adapter given to --to peft is named for what it is, not searched for a diffusers file.
    code, _, err = run_peft(capsys, "convert", "--to", "peft", "--from", "diffusers", str(peft_dir),
                            str(tmp_path / "p"))
    assert code == 1 and f"{peft_dir} is already in the PEFT format" in one_line_error(err, "convert")
    (tmp_path / "empty").mkdir()
    code, _, err = run_peft(capsys, "convert", "--to", "peft", str(tmp_path / "empty"), str(tmp_path / "p"))
    assert code == 1 and "has no pytorch_lora_weights.safetensors, so it holds no diffusers LoRA" in err
    assert not (tmp_path / "p").exists()


def _set_alpha_nan(directory: Path) -> None:
    text = (directory / "adapter_config.json").read_text()
    (directory / "adapter_config.json").write_text(re.sub(r'"lora_alpha": [^,]+', '"lora_alpha": NaN', text))


def _set_huge_rank(directory: Path) -> None:
    text = (directory / "adapter_config.json").read_text()
    (directory / "adapter_config.json").write_text(re.sub(r'"r": \d+', '"r": 1e400', text))


def _int_factor(directory: Path) -> None:
    tensors = load_file(directory / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, directory / "adapter_model.safetensors")


@pytest.mark.parametrize(("edit", "message"), [
    (_set_alpha_nan, "lora_alpha must be a finite number"),
    (_set_huge_rank, "LoraConfig.r must be int, not float (inf)"),
    (_int_factor, "torch.int32"),
], ids=["alpha-nan", "rank-1e400", "int32-factor"])
def test_convert_reads_and_checks_an_adapter_as_the_loader_does(capsys, unet_adapter, tmp_path, edit, message):
    """What the loader refuses, convert refuses too, rather than writing a file that will not load."""
    _, peft_dir = unet_adapter
    strip_checksums(peft_dir)  # a file from elsewhere
    edit(peft_dir)
    with pytest.raises(PeftError, match=re.escape(message)):
        PeftModel.from_pretrained(tiny_unet(), peft_dir)
    code, _, err = run_peft(capsys, "convert", "--to", "diffusers", str(peft_dir), str(tmp_path / "d"))
    assert code == 1 and message in one_line_error(err, "convert")
    assert not (tmp_path / "d" / LORA_WEIGHT_NAME).exists()


def test_convert_from_diffusers_refuses_what_would_not_load(capsys, unet_adapter, tmp_path):
    model, _ = unet_adapter
    file = Path(save_diffusers_lora(model, tmp_path / "diffusers"))
    with safe_open(file, "pt") as f:
        header = f.metadata()
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    save_file({**tensors, key: tensors[key].to(torch.int32)}, file, metadata=header)
    code, _, err = run_peft(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "p"))
    assert code == 1 and "is stored as torch.int32" in one_line_error(err, "convert")

    metadata = json.loads(header[METADATA_KEY])
    save_file(tensors, file, metadata={**header, METADATA_KEY: json.dumps({**metadata, "unet.lora_alpha": math.nan})})
    code, _, err = run_peft(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "p"))
    assert code == 1 and "lora_alpha must be a finite number" in one_line_error(err, "convert")

    deep = '{"unet": ' + "[" * 100_000 + "]" * 100_000 + "}"
    save_file(tensors, file, metadata={**header, METADATA_KEY: deep})
    code, _, err = run_peft(capsys, "convert", "--to", "peft", str(file), str(tmp_path / "p"))
    assert code == 1 and "nest thousands of levels deep" in one_line_error(err, "convert")
    assert not (tmp_path / "p" / "adapter_config.json").exists()
