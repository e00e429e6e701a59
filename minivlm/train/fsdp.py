"""FSDP (ZeRO stage 3): shard parameters, gradients and optimizer state across data-parallel ranks.

    torchrun --nproc_per_node N train_sft.py --ddp --fsdp ...

`--ddp` joins the process group, `--fsdp` replaces the DDP wrapper with torch's FSDP2
(`fully_shard`, Zhao et al. 2023, "PyTorch FSDP"): every parameter becomes a DTensor split along
dim 0 into N shards. A unit's whole parameters are all-gathered just before its forward (again
before its backward) and freed after; gradients are reduce-scattered, so each rank keeps the
gradient of its shard only, and a plain AdamW updates only that shard. Per rank, for Ψ fp32
parameters: (4 + 4 + 8)Ψ / N, plus the gathered parameters of the units in flight.

Units: each decoder layer is one; the root holds the rest (embeddings, lm_head, vision tower,
projector, mask decoder). The vision tower and the mask decoder are not units of their own
because they run only on ranks whose batch holds images or masks, and FSDP2 assumes every rank
runs the same units in the same order: a unit skipped on one rank leaves its peers waiting in an
all-gather (pytorch/pytorch#158719). The root is gathered on every rank at every forward, and
a root parameter that this rank's batch left unused but another rank's used gets a zero gradient
(`_zero_gradient_for_unused`), so every rank reduce-scatters the same tensors; one unused on
every rank keeps no gradient and AdamW skips it. That is DDP's find_unused_parameters exactly.

Gradient accumulation reduce-scatters after every micro-batch (no `no_sync`): skipping it would
keep whole, unsharded gradients (4Ψ per rank), the memory FSDP exists to save.

Checkpoints: the full weights are gathered for model.safetensors (it loads in one process, under
DDP or ZeRO-1); each rank saves its optimizer shard as plain local tensors, which
`merge_fsdp_shards` (python -m minivlm.consolidate) concatenates into a plain AdamW state dict.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from minivlm.train.distributed import DistributedEnv
from minivlm.weights.checkpoint import read_weights, tied_names


def check_fsdp_flags(config) -> None:
    """--fsdp needs the process group --ddp sets up, and it replaces ZeRO-1's sharding."""
    if config.fsdp and config.zero1:
        raise ValueError("--fsdp and --zero1 both shard the optimizer state; pass one of them "
                         "(--fsdp also shards parameters and gradients)")
    if config.fsdp and not config.ddp:
        raise ValueError("--fsdp shards the model over torchrun's processes and needs --ddp: "
                         "torchrun --nproc_per_node N script.py --ddp --fsdp")


def shard_model(model: nn.Module, env: DistributedEnv, dtype: torch.dtype) -> None:
    """fully_shard each decoder layer, then the root, in place (before building the optimizer:
    the parameters become DTensor shards)."""
    if not hasattr(FSDPModule, "reset_iter_state"):  # unsharded() needs it (see there)
        raise ValueError(f"--fsdp needs a newer torch than {torch.__version__} (its FSDP2 has "
                         "no reset_iter_state; 2.14 has it): upgrade torch, or use --zero1")
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # On CUDA with bf16, gather and compute in bf16 (half the all-gather bytes) while gradients
    # are reduced and the sharded master weights kept in fp32. CPU runs fp32 throughout.
    bf16 = env.device.type == "cuda" and dtype == torch.bfloat16
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32)
    root_names = {name for name, p in model.named_parameters()
                  if p.requires_grad and not name.startswith("lm.layers.")}
    for layer in model.lm.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root is gathered again right away for the backward, so it stays gathered after forward
    # (FSDP's own default for the root, set here explicitly so `unsharded` can restore it).
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    model.register_forward_hook(lambda module, args, out: _zero_gradient_for_unused(
        module, out, root_names, env))


def _used_parameters(loss: torch.Tensor) -> set[int]:
    """ids of the leaves the loss's backward reaches (the graph walk DDP's find_unused_parameters
    does): each is an AccumulateGrad node's `variable`."""
    used, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            used.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return used


def _zero_gradient_for_unused(model: nn.Module, out, root_names: set[str], env: DistributedEnv):
    """Add 0 x the root parameters that this rank's batch did not use but another rank's did (the
    mask decoder on a batch without masks), so they get a gradient here too."""
    if not (model.training and torch.is_grad_enabled()) or getattr(out, "loss", None) is None:
        return out  # not a training step: rank 0 may be validating alone, no collective here
    # The root stays gathered after forward: these are its whole parameters, not shards.
    params = [p for name, p in model.named_parameters() if name in root_names]
    used = _used_parameters(out.loss)
    used_here = torch.tensor([id(p) in used for p in params], dtype=torch.int32,
                             device=env.device)
    used_anywhere = used_here.clone()
    dist.all_reduce(used_anywhere)  # (n_root_params,) ranks that used each
    missing = [p.sum() for p, here, anywhere in zip(params, used_here.tolist(),
                                                   used_anywhere.tolist()) if anywhere and not here]
    if missing:
        out.loss = out.loss + 0.0 * torch.stack(missing).sum()
    return out


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Every unit's whole parameters, kept gathered, so that rank 0 alone can run validation
    (generate, predict_masks) with no collective. Every rank must enter; no-op without FSDP."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root, as shard_model set it
        for unit in units:
            unit.reshard()
        # Rank 0's forwards here recorded a forward order that no backward cleared; the next
        # backward would prefetch by it, out of step with the other ranks' collectives (a hang).
        model.reset_iter_state()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on CPU, on rank 0 (an empty dict elsewhere); every rank must call it.
    A tied weight (lm_head = embed_tokens) is kept once, under its first name, as save_model."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    for name in tied_names(model):
        state.pop(name, None)
    return state


def load_fsdp_weights(model: nn.Module, path: Path) -> None:
    """Load a full model.safetensors (checked as load_weights does) into the shards: each rank
    keeps its dim-0 slice."""
    state = read_weights(model, path)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            full = state[name].to(tensor.device, tensor.dtype)
            if isinstance(tensor, DTensor):
                # src_data_rank=None: every rank holds the full tensor and slices it, no traffic
                full = distribute_tensor(full, tensor.device_mesh, tensor.placements,
                                         src_data_rank=None).to_local()
                tensor = tensor.to_local()
            tensor.copy_(full)


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """This rank's optimizer state with DTensor shards as plain tensors (torch.load-able with
    weights_only=True, and mergeable by concatenation)."""
    state = optimizer.state_dict()
    state["state"] = {index: {name: v.to_local().cpu() if isinstance(v, DTensor) else v
                              for name, v in values.items()}
                      for index, values in state["state"].items()}
    return state


def load_fsdp_optimizer_state(optimizer: torch.optim.Optimizer, state: dict,
                              is_shard: bool) -> None:
    """Load this rank's own shard (same world size) or a full AdamW state dict (any world size:
    each rank slices its part)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def as_dtensor(value, param: DTensor):
        if not torch.is_tensor(value) or value.ndim == 0:  # AdamW's step count
            return value
        value = value.to(param.device)
        if is_shard:
            return DTensor.from_local(value, param.device_mesh, param.placements,
                                      shape=param.shape, stride=param.stride())
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    state = dict(state, state={index: {name: as_dtensor(v, params[index])
                                       for name, v in values.items()}
                               for index, values in state["state"].items()})
    optimizer.load_state_dict(state)


def merge_fsdp_shards(shards: list[dict]) -> dict:
    """Concatenate per-rank FSDP optimizer shards (rank order, along dim 0, as fully_shard split
    the parameters) into the state dict of a plain AdamW over the whole parameters."""
    full = {"param_groups": shards[0]["param_groups"], "state": {}}
    for index, values in shards[0]["state"].items():
        full["state"][index] = {
            name: torch.cat([shard["state"][index][name] for shard in shards])
            if torch.is_tensor(value) and value.ndim > 0 else value
            for name, value in values.items()}
    return full
