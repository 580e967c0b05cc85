"""The model-coverage matrix: every registered method on every model family of ``model_families.py``.

Each cell injects the method with its default targets (a tiny config, no ``target_modules``) and checks that
one optimizer step lowers the loss, that ``save_pretrained`` then ``PeftModel.from_pretrained`` on a fresh base
gives equal outputs, that ``merge_and_unload`` gives equal outputs (methods that merge; the others must refuse),
and, where Hugging Face PEFT has the method, that adapters cross-load with it both ways with equal outputs.
A cell where the method does not apply (soft prompts on a model without token inputs) must be refused with a
:class:`~peft_core.errors.PeftError`.

Each cell records what it observed. The last test checks ``docs/model-coverage.md`` against those records,
or, with ``PEFT_WRITE_COVERAGE=1``, writes the page from them (run the whole module then).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from peft_core import Method, PeftError, PeftModel, get_peft_model, methods
from peft_core.config import LayerConfig, PeftConfig
from peft_core.layer import AdapterLayer
from peft_core.model import TASK_MODELS, prepare_config
from peft_core.plugins import registry
from peft_core.walk import find_target_modules, iter_modules
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from model_families import FAMILIES, Family, FamilyCache

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "model-coverage.md"
WRITE = os.environ.get("PEFT_WRITE_COVERAGE") == "1"
ATOL = RTOL = 1e-5
MERGE_TOLERANCE = 1e-4  # the merged weights round differently from the two matmuls they replace
LEARNING_RATE = 1e-2

# Tiny settings for the installed methods; a method not listed here runs with its config's own defaults.
TINY_SETTINGS: dict[str, dict[str, object]] = {
    "lora": dict(r=4, lora_alpha=8),
    "qlora": dict(r=4, lora_alpha=8),
    "adalora": dict(init_r=4, target_r=2, total_step=4),
    "prompt-tuning": dict(num_virtual_tokens=4),
    "p-tuning": dict(num_virtual_tokens=4, encoder_hidden_size=32),
    "prefix-tuning": dict(num_virtual_tokens=4),
}
# The role of each installed layer method's default targets: LoRA-like methods adapt attention projections;
# IA3 scales keys and values (outputs of attention layers) and the feed-forward output (its input).
ATTENTION_ROLE = {"lora", "qlora", "adalora"}
IA3_ROLE = {"ia3"}
# Installed methods that must work on every family: the layer methods' defaults cover them all, and the
# soft prompts that go before the token embeddings fit every model that takes tokens. (Prefix tuning needs
# a key/value cache argument, which some forwards lack; other methods may refuse with a PeftError.)
MUST_WORK = {"lora", "qlora", "adalora", "ia3", "prompt-tuning", "p-tuning"}

METHODS: dict[str, Method] = {m.name: m for m in methods() if m.broken is None}


# --- what each cell observed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """``status``: ``"works"`` or ``"refused"``; ``merges`` / ``hf``: what else the cell showed (works only);
    ``reason``: the first sentence of the refusal; ``targets``: the default targets a layer method injected
    (IA3's feed-forward ones marked ``*``)."""

    status: str
    merges: bool = False
    hf: bool = False
    reason: str = ""
    targets: str = ""


RESULTS: dict[tuple[str, str], Outcome] = {}


def first_sentence(message: str) -> str:
    """The first sentence of an error message, on one line (a sentence ends before a capital letter, so that
    "e.g. x" does not end one)."""
    text = " ".join(message.split())
    found = re.match(r"(.+?[.!?])(?=\s+[A-Z]|$)", text)
    return found.group(1) if found else text


# --- helpers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> FamilyCache:
    return FamilyCache(tmp_path_factory.mktemp("model_families"))


def tiny_config(method: Method, family: Family) -> PeftConfig:
    head = {"modules_to_save": list(family.head)} if family.head else {}
    return method.config_class(task_type=family.task_type, **head, **TINY_SETTINGS.get(method.name, {}))


def loading_base(method: Method, family: Family, bases: FamilyCache) -> nn.Module | None:
    """A fresh base prepared as ``get_peft_model`` prepares it (quantized, for a quantizing method), or None
    if the method does not change the base before injecting."""
    base, config = bases.base(family), tiny_config(method, family)
    prepare_config(base, config, TASK_MODELS.get(config.task_type, PeftModel))
    return registry().hook.peft_quantize(model=base, config=config)


def one_step(model: nn.Module, family: Family) -> tuple[float, float]:
    """The loss before and after one Adam step on the batch.

    Eval mode, so that no dropout draws; both losses with gradients enabled, so that they take the same path
    (bitsandbytes' CPU 4-bit layers compute in bfloat16 when no gradient is needed).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE)
    loss = family.loss(model)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item(), family.loss(model).item()


def perturb(model: nn.Module) -> None:
    """Move every trainable tensor (the adapter, a trained head) well away from where one step left it, so
    that every comparison below could fail."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def assert_same(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


def is_attention(name: str) -> bool:
    return any("attn" in part.lower() or "attention" in part.lower() for part in name.split("."))


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in iter_modules(model) if isinstance(m, AdapterLayer) and "default" in m.adapters}


def check_default_targets(model: PeftModel, method: Method, family: Family, bases: FamilyCache) -> None:
    """The adapted layers are the method's defaults for the family, and play their role."""
    config = tiny_config(method, family)
    if not isinstance(config, LayerConfig):
        return
    layers = adapter_layers(model.get_base_model())
    expected = [name for name, _ in find_target_modules(bases.base(family), config)]
    assert sorted(layers) == sorted(expected), "the adapted layers are not the default targets"
    if method.name in ATTENTION_ROLE:
        outside = [name for name in layers if not is_attention(name)]
        assert not outside, f"default targets outside attention: {outside}"
    if method.name in IA3_ROLE:
        acts = {name: layer.adapters["default"].acts_on for name, layer in layers.items()}
        scaled_inputs = [name for name, acts_on in acts.items() if acts_on == "input"]
        scaled_outputs = [name for name, acts_on in acts.items() if acts_on == "output"]
        assert scaled_inputs, "IA3's defaults scale no feed-forward layer's input"
        assert scaled_outputs and all(is_attention(n) for n in scaled_outputs), \
            f"IA3's defaults scale outputs outside attention (keys and values): {scaled_outputs}"


def hf_has(method: Method) -> bool:
    """Whether Hugging Face PEFT reads and writes this method's adapters (QLoRA's are LoRA's: skipped)."""
    return method.loads_adapters and method.peft_type in peft.PeftType.__members__


def hf_outputs(hf: nn.Module, method: Method, family: Family) -> torch.Tensor:
    # HF's task wrappers pass input_ids to models that take none (Whisper); its layers are in the base model.
    return family.outputs(hf if method.transforms_inputs else hf.get_base_model())


def hf_runs(method: Method, family: Family, bases: FamilyCache, saved: Path, tmp_path: Path) -> bool:
    """Save, with Hugging Face PEFT, an adapter of the config we saved (perturbed, so that it matters), into
    ``tmp_path / "hf"``; False if HF cannot run the method on this family at all."""
    hf_config = peft.PeftConfig.from_pretrained(saved)
    hf_config.inference_mode = False
    try:
        hf = peft.get_peft_model(bases.base(family), hf_config)
        perturb(hf)
        hf.eval()
        hf_outputs(hf, method, family)
    except Exception:  # HF's own limits; ours are checked by the cell
        return False
    hf.save_pretrained(tmp_path / "hf")
    return True


def check_hf_both_ways(
    ours: PeftModel, method: Method, family: Family, bases: FamilyCache, saved: Path, tmp_path: Path
) -> bool:
    """Where HF runs the method on the family: our saved adapter gives HF our outputs, and HF's gives us its."""
    if not hf_runs(method, family, bases, saved, tmp_path):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(bases.base(family), saved).eval()
    assert_same(hf_outputs(hf, method, family), family.outputs(ours))

    hf = peft.PeftModel.from_pretrained(bases.base(family), tmp_path / "hf").eval()
    loaded = PeftModel.from_pretrained(bases.base(family), tmp_path / "hf")
    assert_same(family.outputs(loaded), hf_outputs(hf, method, family))
    return True


def run_cell(method: Method, family: Family, bases: FamilyCache, tmp_path: Path) -> Outcome:
    base = bases.base(family)
    plain = family.outputs(base)
    try:
        model = get_peft_model(base, tiny_config(method, family))
        before, after = one_step(model, family)
    except PeftError as exc:
        return Outcome("refused", reason=first_sentence(str(exc)))
    assert after < before, f"one step did not lower the loss ({before:.5f} -> {after:.5f})"
    check_default_targets(model, method, family, bases)
    targets = injected_defaults(model.peft_config["default"])
    perturb(model)
    model.eval()
    adapted = family.outputs(model)
    assert (adapted - plain).abs().max() > 1e-3, "the adapter does not change the outputs"

    model.save_pretrained(tmp_path / "ours")
    quantized = loading_base(method, family, bases)
    fresh = quantized if quantized is not None else bases.base(family)
    assert_same(family.outputs(PeftModel.from_pretrained(fresh, tmp_path / "ours")), adapted)

    hf = hf_has(method) and check_hf_both_ways(model, method, family, bases, tmp_path / "ours", tmp_path)

    if not method.merges:
        with pytest.raises(PeftError, match="cannot be merged"):
            model.merge_and_unload()
        return Outcome("works", hf=hf, targets=targets)
    if quantized is not None and method.name == "qlora":
        # Merging into 4-bit weights re-quantizes them; the exact merge is into the dequantized base.
        from peft_qlora import dequantize_model

        dequantize_model(model)
        adapted = family.outputs(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert_same(family.outputs(merged), adapted, MERGE_TOLERANCE)
    return Outcome("works", merges=True, hf=hf, targets=targets)


def injected_defaults(config: PeftConfig) -> str:
    """The default targets a layer method's config recorded, feed-forward ones (IA3) marked ``*``."""
    if not isinstance(config, LayerConfig) or not isinstance(config.target_modules, list):
        return ""
    feedforward = getattr(config, "feedforward_modules", None) or []
    return ", ".join(name + "*" * (name in feedforward) for name in config.target_modules)


# --- the matrix ------------------------------------------------------------------------------------------

CELLS = [(m, f) for m in METHODS for f in FAMILIES]


@pytest.mark.parametrize(("method_name", "family_name"), CELLS, ids=[f"{m}-{f}" for m, f in CELLS])
def test_cell(method_name: str, family_name: str, bases: FamilyCache, tmp_path: Path) -> None:
    method, family = METHODS[method_name], FAMILIES[family_name]
    torch.manual_seed(0)
    outcome = run_cell(method, family, bases, tmp_path)
    RESULTS[(method_name, family_name)] = outcome  # what was observed, before what is required of it
    if method.transforms_inputs and not family.takes_tokens:
        assert outcome.status == "refused", f"{method.name} on {family.title}, which takes no tokens, must be refused"
    elif method.name in MUST_WORK:
        assert outcome.status == "works", f"refused: {outcome.reason}"


# --- the generated page ----------------------------------------------------------------------------------

INTRO = """\
# Model coverage

Which method works on which model family, as the test matrix `tests/test_model_coverage.py` observed it.
This page is generated from the test results, not written by hand: each cell builds a tiny, randomly
initialised model of the family (`tests/model_families.py`), adds the method with a tiny default config
(no `target_modules`, so the method's default targets for the family, from `peft_core.targets`, are used),
and checks that

- the injected layers are the default targets (attention projections for LoRA, QLoRA and AdaLoRA; keys,
  values and the feed-forward output for IA3),
- one optimizer step lowers the loss,
- `save_pretrained` then `PeftModel.from_pretrained` on a fresh base gives equal outputs,
- `merge_and_unload` gives equal outputs (methods that merge; soft prompts must refuse to),
- adapters cross-load with Hugging Face PEFT both ways with equal outputs, where it has the method.

A method that does not apply to a family (soft prompts on a model without token inputs) must refuse it
with a `PeftError`; the refusal's first sentence is listed under the table.

Regenerate the page after changing a method, its defaults or a family:

```
PEFT_WRITE_COVERAGE=1 .venv/bin/python -m pytest tests/test_model_coverage.py
```

Without the variable, the last test of the module fails if this page disagrees with what the cells observe.

Legend: ✓ works (injects, trains, saves and loads); **M** merges with `merge_and_unload`; **HF** cross-loads
with Hugging Face PEFT both ways (not checked where HF has no such method, as for BitFit, or where the
adapters are another method's: QLoRA saves LoRA adapters, which the LoRA column cross-loads); ✗ *n* refused,
with reason *n* below.
"""


def cell_text(outcome: Outcome, reasons: list[str]) -> str:
    if outcome.status == "refused":
        return f"✗ {reasons.index(outcome.reason) + 1}"
    return " ".join(["✓", *(["M"] if outcome.merges else []), *(["HF"] if outcome.hf else [])])


def render(results: dict[tuple[str, str], Outcome]) -> str:
    method_names = sorted({m for m, _ in results})
    family_names = [f for f in FAMILIES if any((m, f) in results for m in method_names)]
    # Numbered in reading order: row by row.
    ordered = [results[(m, f)] for f in family_names for m in method_names]
    reasons = list(dict.fromkeys(o.reason for o in ordered if o.status == "refused"))
    lines = [INTRO, "| family | " + " | ".join(method_names) + " |", "|---" * (len(method_names) + 1) + "|"]
    for f in family_names:
        cells = [cell_text(results[(m, f)], reasons) for m in method_names]
        lines.append(f"| {FAMILIES[f].title} | " + " | ".join(cells) + " |")
    if reasons:
        lines += ["", "Reasons for refusals:", ""]
        lines += [f"{i}. {reason}" for i, reason in enumerate(reasons, start=1)]
    layer_methods = [m for m in method_names if any(results[(m, f)].targets for f in family_names)]
    if layer_methods:
        lines += [TARGETS_HEADING, "| family | " + " | ".join(layer_methods) + " |",
                  "|---" * (len(layer_methods) + 1) + "|"]
        for f in family_names:
            cells = [results[(m, f)].targets or "-" for m in layer_methods]
            lines.append(f"| {FAMILIES[f].title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TARGETS_HEADING = """
## Default targets

The modules each layer method adapted with `target_modules=None`, as the cells above recorded them in the
saved config (from the one table in `peft_core.targets`; plugins add families and roles with the
`peft_default_targets` hook). A `*` marks IA3's `feedforward_modules`, whose input it scales.
"""


def parse(page: str) -> dict[tuple[str, str], Outcome]:
    """The outcomes a generated page shows, by (method, family)."""
    outcomes_part, _, targets_part = page.partition(TARGETS_HEADING)
    by_title = {f.title: f.name for f in FAMILIES.values()}
    reasons = dict(re.findall(r"^(\d+)\. (.*)$", outcomes_part, flags=re.MULTILINE))
    targets = {key: cell for key, cell in table_cells(targets_part, by_title).items() if cell != "-"}
    found = {}
    for key, cell in table_cells(outcomes_part, by_title).items():
        if cell.startswith("✗"):
            found[key] = Outcome("refused", reason=reasons[cell.split()[1]])
        else:
            found[key] = Outcome("works", merges="M" in cell.split(), hf="HF" in cell.split(),
                                 targets=targets.get(key, ""))
    return found


def table_cells(text: str, by_title: dict[str, str]) -> dict[tuple[str, str], str]:
    """(method, family) -> cell text of the first table in ``text``."""
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    if not rows:
        return {}
    method_names = [c.strip() for c in rows[0].strip("|").split("|")][1:]
    cells = {}
    for row in rows[1:]:
        title, *values = [c.strip() for c in row.strip("|").split("|")]
        for method_name, value in zip(method_names, values, strict=True):
            cells[(method_name, by_title.get(title, title))] = value
    return cells


def test_a_rendered_page_reads_back_as_the_outcomes_it_shows() -> None:
    results = {
        ("lora", "llama"): Outcome("works", merges=True, hf=True, targets="q_proj, v_proj"),
        ("lora", "vit"): Outcome("refused", reason="No."),
        ("x", "llama"): Outcome("works"), ("x", "vit"): Outcome("refused", reason="Not (e.g. this) either."),
    }
    page = render(results)
    assert "| ViT (image classification) | ✗ 1 | ✗ 2 |" in page
    assert parse(page) == results


# Last in the module: it reads what the cells above recorded.
def test_the_coverage_page_shows_what_the_cells_observed() -> None:
    assert RESULTS, "no cell ran before this test; run the whole module"
    if WRITE:
        missing = sorted(set(CELLS) - set(RESULTS))
        assert not missing, f"cells crashed or did not run, so the page would be incomplete: {missing}"
        DOC.write_text(render(RESULTS))
        return
    committed = parse(DOC.read_text()) if DOC.is_file() else {}
    stale = {cell: (committed.get(cell), seen) for cell, seen in RESULTS.items() if committed.get(cell) != seen}
    assert not stale, (
        f"docs/model-coverage.md disagrees with the cells (committed, observed): {stale}. Regenerate it with "
        f"PEFT_WRITE_COVERAGE=1 .venv/bin/python -m pytest tests/test_model_coverage.py"
    )
    if len(RESULTS) == len(CELLS):
        assert DOC.read_text() == render(RESULTS), "docs/model-coverage.md is not the page the results render"
