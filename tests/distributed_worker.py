"""LoRA trained by several processes, with DDP, FSDP2 (``fully_shard``) or FSDP1, on CPU with gloo.

A runnable example (see docs/integrations/distributed.md) and the worker of tests/test_distributed.py::

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py --output /tmp/dist --strategy ddp fsdp2

Every rank builds the same tiny Llama with the same LoRA (fixed seed), takes its share of one fixed global
batch, trains a few steps with AdamW, and writes to ``OUTPUT/<strategy>/``:

- ``rank<r>.pt``: the full adapter tensors as this rank sees them after training, the mean loss of the
  global batch and the norm of the averaged gradient at each step, the trainable parameter names, and how
  many frozen base elements the rank holds;
- ``adapter/`` (rank 0 only): the trained adapter, saved with ``save_pretrained`` in the usual format.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
from peft_core import PeftModel, get_peft_model
from peft_core.testing import tiny_model
from peft_lora import LoraConfig
from torch import nn

SEED = 0
STEPS = 4
LEARNING_RATE = 1e-2
STRATEGIES = ("ddp", "fsdp2", "fsdp1")


def lora_config() -> LoraConfig:
    # No dropout: each rank would draw its own mask, and the run could not equal a single-process one.
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def global_batch() -> torch.Tensor:
    """Token ids (4 sequences of 16, no padding), also the labels: every sequence has the same number of
    predicted tokens, so the mean of the ranks' mean losses is the mean loss of the whole batch."""
    return torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def build_model(base_dir: str | os.PathLike) -> PeftModel:
    """The same model on every rank: LoRA's A is drawn from the global RNG, so seed it first."""
    torch.manual_seed(SEED)
    return get_peft_model(tiny_model("llama", base_dir), lora_config())


# --- wrapping ---------------------------------------------------------------------------------------


def wrap(model: PeftModel, strategy: str) -> nn.Module:
    """The module to call and to optimise; all three wrap the PeftModel after get_peft_model, so the
    adapter's parameters exist (and are the only trainable ones) when the wrapper takes stock."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)  # CPU: no device_ids
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        # One shard group per decoder block (its base weights and its LoRA factors together), then the
        # root for what is left (embeddings, norm, head). fully_shard changes the modules in place.
        for block in model.get_base_model().model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # use_orig_params=True: a block's flat parameter mixes frozen base weights and trainable LoRA
        # factors, which FSDP1 allows only in this mode.
        return FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
            device_id=torch.device("cpu"),
        )
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


def peft_model_of(wrapped: nn.Module) -> PeftModel:
    """The PeftModel inside the wrapper (fully_shard keeps the module itself)."""
    return wrapped if isinstance(wrapped, PeftModel) else wrapped.module


# --- saving on rank 0 -------------------------------------------------------------------------------


def save_adapter_on_rank0(wrapped: nn.Module, strategy: str, directory: str | os.PathLike) -> None:
    """Write the trained adapter with ``save_pretrained``; every rank must call this (FSDP gathers)."""
    if strategy == "ddp":
        # Every rank holds the whole, identical model: rank 0 saves, the others need not take part.
        if dist.get_rank() == 0:
            wrapped.module.save_pretrained(directory)
    else:
        save_sharded_adapter(wrapped, directory)
    dist.barrier()  # the adapter is on disk before any rank goes on (and, in the tests, exits)


def save_sharded_adapter(wrapped: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Save the adapter of an FSDP-sharded PeftModel (FSDP2 or FSDP1) from rank 0; every rank must call this.

    save_pretrained cannot run on the sharded model itself: FSDP2's parameters are DTensors, which it
    cannot write, and FSDP1's nested wrappers put ``_fsdp_wrapped_module.`` into the saved keys. So:
    gather the trainable parameters (the active adapter; the frozen base is not gathered) into full CPU
    tensors on rank 0, put them into a copy of the PeftModel built on the meta device (no memory for
    the base weights), and save that copy.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    model = peft_model_of(wrapped)
    # Offloading gathers onto rank 0's CPU alone; with parameters already on the CPU it is moot, and FSDP1
    # then leaves the tensors pointing at freed memory (torch 2.13 segfaults reading them). Without it,
    # every rank receives the gathered adapter, which is small.
    on_accelerator = any(p.device.type != "cpu" for p in wrapped.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_accelerator, ignore_frozen_params=True)
    trained = get_model_state_dict(wrapped, options=options)  # a collective: every rank calls it
    if dist.get_rank() != 0:
        return
    with torch.device("meta"):
        skeleton = get_peft_model(
            AutoModelForCausalLM.from_config(model.config), copy.deepcopy(model.peft_config[adapter_name]),
            adapter_name,
        )
    loaded = skeleton.load_state_dict(trained, strict=False, assign=True)
    left_on_meta = [n for n, p in skeleton.named_parameters() if p.requires_grad and p.is_meta]
    if loaded.unexpected_keys or left_on_meta:
        raise RuntimeError(f"the gathered tensors do not fit the copy: unexpected {loaded.unexpected_keys[:3]}, "
                           f"not gathered {left_on_meta[:3]}")
    skeleton.save_pretrained(directory, selected_adapters=[adapter_name])


# --- what the tests compare -------------------------------------------------------------------------


def full_trainable_tensors(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, under its name in the bare PeftModel; every rank gets them.

    ``get_model_state_dict`` strips the wrappers' prefixes and, with ``full_state_dict``, all-gathers
    shards; under DDP it reads each rank's own replica, so the ranks can be compared.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    return {k: v.detach().clone() for k, v in get_model_state_dict(wrapped, options=options).items()}


def gradient_norm(wrapped: nn.Module, strategy: str) -> float:
    """The norm of the whole averaged gradient, which AdamW's updates hide (they do not scale with it)."""
    if strategy == "fsdp1":
        return wrapped.clip_grad_norm_(float("inf")).item()  # FSDP1 reduces over the shards itself
    norm = nn.utils.clip_grad_norm_([p for p in wrapped.parameters() if p.requires_grad], float("inf"))
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP2: a DTensor


def frozen_elements_held(wrapped: nn.Module) -> int:
    """How many frozen base elements this rank keeps in memory between steps.

    A DTensor (FSDP2) counts its own shard; FSDP1's original parameters are already views of this rank's
    part of the flat parameter.
    """
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in wrapped.parameters()
               if not p.requires_grad)


# --- the run ----------------------------------------------------------------------------------------


def train(strategy: str, base_dir: str | os.PathLike, output: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(base_dir)
    # Only these train; recorded before wrapping, whose parameter names differ by strategy.
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    frozen_total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    wrapped = wrap(model, strategy)
    frozen_held = frozen_elements_held(wrapped)
    # After wrapping: FSDP replaces parameters by sharded ones, and the optimizer must step those.
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LEARNING_RATE)
    shard = global_batch().chunk(world)[rank]
    wrapped.train()
    losses, gradient_norms = [], []
    for _ in range(STEPS):
        loss = wrapped(input_ids=shard, labels=shard).loss
        loss.backward()  # DDP and FSDP average the gradients over ranks: the global batch's mean loss
        gradient_norms.append(gradient_norm(wrapped, strategy))
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    wrapped.eval()
    torch.save({
        "adapter": full_trainable_tensors(wrapped), "losses": losses, "gradient_norms": gradient_norms,
        "trainable": trainable, "frozen_held": frozen_held, "frozen_total": frozen_total,
    }, output / f"rank{rank}.pt")
    save_adapter_on_rank0(wrapped, strategy, output / "adapter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="where results and adapters go")
    parser.add_argument("--base-model", type=Path, help="a saved tiny Llama (built there if missing); "
                        "default OUTPUT/base")
    parser.add_argument("--strategy", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    args = parser.parse_args()
    base_dir = args.base_model or args.output / "base"

    torch.set_num_threads(1)  # tiny matrices: threads only contend (torchrun sets OMP_NUM_THREADS=1 too)
    dist.init_process_group("gloo")  # rank, world size and rendezvous from torchrun's environment
    try:
        if dist.get_rank() == 0:
            tiny_model("llama", base_dir)  # builds and saves it if missing, before the others load it
        dist.barrier()
        for strategy in args.strategy:
            output = args.output / strategy
            output.mkdir(parents=True, exist_ok=True)
            train(strategy, base_dir, output)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
