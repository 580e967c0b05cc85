"""AdaLoRA: config errors, layer numerics, merging, training, the rank allocator, HF PEFT cross-loading."""

from __future__ import annotations

import json
import warnings

import pytest
import safetensors.torch
import torch
from peft_adalora import AdaLoraCallback, AdaLoraConfig, install_allocator, update_and_allocate
from peft_core import ConfigError, PeftModel, get_peft_model
from peft_core.testing import tiny_model, train_steps

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def randomize(model, seed=0):
    """Random adapter values (E included), so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def config(kind, **kwargs):
    defaults = dict(init_r=4, target_r=2, tinit=4, tfinal=4, deltaT=2, total_step=20, lora_alpha=16)
    return AdaLoraConfig(target_modules=TARGETS[kind], **{**defaults, **kwargs})


def adapters(peft_model):
    from peft_adalora.layer import SVDAdapter

    return [m for m in peft_model.modules() if isinstance(m, SVDAdapter)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(total_step=None), "total_step"),
        (dict(total_step=10, tinit=6, tfinal=4), "tinit"),
        (dict(total_step=10, init_r=4, target_r=8), "target_r"),
        (dict(total_step=10, beta1=1.0), "beta1"),
        (dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight"),
        (dict(total_step=10, bias="some"), "bias"),
    ],
)
def test_invalid_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdaLoraConfig(**kwargs)


def test_layer_computes_the_svd_form_and_merges_exactly(gpt2, llama, input_ids):
    for kind, model in (("gpt2", gpt2), ("llama", llama)):
        base = logits(model, input_ids)
        peft_model = get_peft_model(model, config(kind))
        torch.testing.assert_close(logits(peft_model, input_ids), base)  # E starts at zero
        randomize(peft_model)
        layer = peft_model.get_base_model().get_submodule("transformer.h.0.attn.c_attn" if kind == "gpt2"
                                                          else "model.layers.0.self_attn.q_proj")
        a = layer.adapters["default"]
        x = torch.randn(3, a.lora_A.shape[1])
        with torch.no_grad():
            expected = layer.base_layer(x) + x @ (a.lora_A * a.lora_E).T @ a.lora_B.T * 16 / (4 + 1e-5)
            torch.testing.assert_close(layer(x), expected)
        adapted = logits(peft_model, input_ids)
        assert (adapted - base).abs().max() > 1e-2
        weights = {n: p.clone() for n, p in peft_model.get_base_model().named_parameters() if "base_layer" in n}
        peft_model.merge_adapter()
        torch.testing.assert_close(logits(peft_model, input_ids), adapted, atol=1e-5, rtol=1e-5)
        peft_model.unmerge_adapter()
        for n, p in peft_model.get_base_model().named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(logits(peft_model, input_ids), adapted)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_lowers_the_loss_and_changes_only_adapters(kind, tiny_model_dir, input_ids):
    torch.manual_seed(0)
    model = tiny_model(kind, tiny_model_dir(kind))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, config(kind, total_step=10, tinit=2, tfinal=2, deltaT=1))
    trained_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained_before and all(".adapters.default.lora_" in n for n in trained_before)
    losses = train_steps(peft_model, input_ids, 10, on_optimizer=lambda opt: install_allocator(peft_model, opt))
    assert losses[-1] < losses[0] - 0.1
    after = {n.replace(".base_layer", ""): p for n, p in peft_model.get_base_model().named_parameters()
             if ".adapters." not in n}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], v) for n, v in before.items())
    changed = {n: not torch.equal(p, trained_before[n]) for n, p in peft_model.named_parameters() if p.requires_grad}
    # A and B all train; a layer whose every singular value was pruned keeps E at its initial zero.
    assert all(v for n, v in changed.items() if not n.endswith("lora_E"))
    assert any(v for n, v in changed.items() if n.endswith("lora_E"))


def test_orthogonal_penalty_is_added_in_training_mode_only(llama, input_ids):
    peft_model = get_peft_model(llama, config("llama", orth_reg_weight=0.5))
    randomize(peft_model)
    peft_model.eval()
    with torch.no_grad():
        plain = peft_model(input_ids=input_ids, labels=input_ids).loss
    peft_model.train()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=input_ids, labels=input_ids).loss, plain)  # no grad: no penalty
    trained = peft_model(input_ids=input_ids, labels=input_ids).loss
    penalty = []
    for a in adapters(peft_model):
        for gram in (a.lora_A @ a.lora_A.T, a.lora_B.T @ a.lora_B):
            penalty.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0])))
    torch.testing.assert_close(trained, plain + 0.5 * torch.stack(penalty).mean())


def train_with_allocator(peft_model, input_ids, steps, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    install_allocator(peft_model, optimizer)
    peft_model.train()
    for _ in range(steps):
        peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_allocator_runs_its_schedule_to_the_target_budget(kind, tiny_model_dir, input_ids, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(kind, tiny_model_dir(kind))
    cfg = config(kind, init_r=6, target_r=2, total_step=20, tinit=4, tfinal=4, deltaT=2)
    peft_model = get_peft_model(model, cfg)
    layers = adapters(peft_model)
    budgets, nonzero = [], []

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    install_allocator(peft_model, optimizer)
    peft_model.train()
    for _ in range(20):
        peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pattern = cfg.rank_pattern or {}
        budgets.append(sum(sum(mask) for mask in pattern.values()) if pattern else 6 * len(layers))
        nonzero.append(sum(int((a.lora_E != 0).sum()) for a in layers))
    peft_model.eval()
    n = len(layers)
    assert budgets[:5] == [6 * n] * 5 and cfg.rank_pattern is not None  # nothing pruned up to tinit
    assert budgets == sorted(budgets, reverse=True) and budgets[6] < 6 * n  # the budget falls every deltaT
    assert budgets[16:] == [2 * n] * 4  # step total_step - tfinal: the target, then kept
    assert nonzero[16:] == [2 * n] * 4  # the final mask is re-applied after every step
    pattern = cfg.rank_pattern
    assert sum(sum(mask) for mask in pattern.values()) == 2 * n and len(pattern) == n

    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == pattern
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_E")) == 2 * n
    assert not any("ranknum" in k for k in tensors)
    expected = logits(peft_model, input_ids)
    loaded = PeftModel.from_pretrained(tiny_model(kind, tiny_model_dir(kind)), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_forgetting_the_allocator_warns(llama, input_ids):
    peft_model = get_peft_model(llama, config("llama", total_step=100, tinit=2, tfinal=0))
    peft_model.train()
    with pytest.warns(UserWarning, match="update_and_allocate was never called"):
        for _ in range(12):
            peft_model(input_ids=input_ids, labels=input_ids).loss.backward()


def test_callback_and_function_allocate(llama, input_ids):
    peft_model = get_peft_model(llama, config("llama", total_step=6, tinit=1, tfinal=1, deltaT=1))
    peft_model.train()
    callback = AdaLoraCallback()
    state = type("State", (), {})()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(6):
            peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
            state.global_step = step
            callback.on_optimizer_step(None, state, None, model=peft_model)
            peft_model.zero_grad()
    assert sum(sum(m) for m in peft_model.peft_config["default"].rank_pattern.values()) == 2 * len(adapters(peft_model))
    update_and_allocate(peft_model, 6)  # after the final step: keeps the final mask


# --- cross-loading with Hugging Face PEFT ------------------------------------------------------------


def hf_config(kind, **kwargs):
    import peft

    defaults = dict(init_r=4, target_r=2, tinit=4, tfinal=4, deltaT=2, total_step=20, lora_alpha=16)
    return peft.AdaLoraConfig(target_modules=TARGETS[kind], **{**defaults, **kwargs})


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("allocated", [False, True])
def test_hf_adapter_loads_in_ours(kind, allocated, tiny_model_dir, input_ids, tmp_path):
    import peft

    torch.manual_seed(0)
    base = tiny_model(kind, tiny_model_dir(kind))
    base_logits = logits(base, input_ids)
    theirs = peft.get_peft_model(base, hf_config(kind))
    randomize(theirs)
    if allocated:  # run HF's allocator through its schedule: the saved adapter has pruned ranks
        optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
        theirs.train()
        for step in range(20):
            theirs(input_ids=input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            theirs.base_model.update_and_allocate(step)
            optimizer.zero_grad()
    theirs.eval()
    expected = logits(theirs, input_ids)
    assert (expected - base_logits).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every field HF writes is understood
        ours = PeftModel.from_pretrained(tiny_model(kind, tiny_model_dir(kind)), tmp_path)
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=1e-5, rtol=1e-5)
    if allocated:
        assert ours.peft_config["default"].rank_pattern


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("allocated", [False, True])
def test_our_adapter_loads_in_hf(kind, allocated, tiny_model_dir, input_ids, tmp_path):
    import peft

    torch.manual_seed(0)
    ours = get_peft_model(tiny_model(kind, tiny_model_dir(kind)), config(kind))
    randomize(ours)
    if allocated:
        train_with_allocator(ours, input_ids, 20)
    ours.eval()
    expected = logits(ours, input_ids)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model(kind, tiny_model_dir(kind)), tmp_path)
    torch.testing.assert_close(logits(theirs, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_training_loss_matches_hf_with_the_penalty(tiny_model_dir, input_ids, tmp_path):
    """Same weights, train mode: HF's loss (with its orthogonal penalty) equals ours."""
    import peft

    # Hugging Face PEFT adds its penalty in the task models' forward only, so both get a task type.
    hf = hf_config("llama", task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_model("llama", tiny_model_dir("llama")), hf)
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_model("llama", tiny_model_dir("llama")), tmp_path, is_trainable=True)
    theirs.train()
    ours.train()
    torch.testing.assert_close(
        ours(input_ids=input_ids, labels=input_ids).loss, theirs(input_ids=input_ids, labels=input_ids).loss
    )


def test_callback_inside_a_real_transformers_trainer(llama, input_ids, tmp_path):
    from transformers import Trainer, TrainingArguments

    peft_model = get_peft_model(llama, config("llama", total_step=8, tinit=2, tfinal=2, deltaT=1))
    rows = [{"input_ids": ids, "labels": ids} for ids in input_ids]
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, remove_unused_columns=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # our "allocator never ran" warning must not fire
        Trainer(model=peft_model, args=arguments, train_dataset=rows, callbacks=[AdaLoraCallback()]).train()
    pattern = peft_model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(mask) for mask in pattern.values()) == 2 * len(adapters(peft_model))


def test_inspect_shows_the_budget_and_the_ranks_the_saved_triplets_have(llama, tmp_path):
    from peft_core.cli.inspect import describe

    cfg = config("llama", init_r=4, target_r=2)
    peft_model = get_peft_model(llama, cfg)
    peft_model.save_pretrained(tmp_path / "full")
    info = describe(str(tmp_path / "full"))
    assert (info["peft_type"], info["init_r"], info["target_r"], info["lora_alpha"]) == ("ADALORA", 4, 2, 16)
    assert info["ranks_in_file"] == [4]
    # What the allocator kept is what the file holds (only kept triplets are saved), and what inspect reports.
    cfg.rank_pattern = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False],
                        "model.layers.1.mlp.down_proj.lora_E": [False, False, False, True]}
    peft_model.save_pretrained(tmp_path / "pruned")
    assert describe(str(tmp_path / "pruned"))["ranks_in_file"] == [1, 2, 4]
