"""Parallelism applied from outside a plain model, as torchtitan does: DDP or FSDP2 under torchrun.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` joins the process group (gloo on CPU,
NCCL on GPU). `parallelize()` then applies activation checkpointing, torch.compile and FSDP2
(`fully_shard` per block, then the root) or DDP to the model in place, keeping its parameter
names, so checkpoints and the release format are the same in every layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from atomlab.model import Transformer


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE_PROCESS = World()


def current_world() -> World:
    """The process's place in the job, from torchrun's environment (one process without it)."""
    return World(
        rank=int(os.environ.get("RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def setup(device_type: str) -> World:
    world = current_world()
    if world.distributed and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        # long enough for rank 0 to prepare data while the others wait
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(hours=3))
    return world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: object) -> object:
    """Rank 0's value on every rank (used to agree on what rank 0 decided)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def parallelize(
    model: Transformer,
    world: World,
    *,
    parallel: str,
    device: torch.device,
    compile: bool,
    activation_checkpointing: bool,
) -> nn.Module:
    """Apply the speed and parallelism features; returns the module to call for training."""
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in model.layers:
            checkpoint(block)  # in place: parameter names stay as they are
    if compile:
        for block in model.layers:
            block.compile()  # per block, as torchtitan does: FSDP hooks stay outside the graphs
    if not world.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def cleanup(finished: bool) -> None:
    if dist.is_initialized():
        if finished:  # no process tears down gloo while another still talks to it
            dist.barrier()
        dist.destroy_process_group()


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's tensor (the same shape on each), stacked along dim 0 in rank order."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_objects(value: object) -> list[object]:
    """Every process's (picklable) value, in rank order."""
    if not dist.is_initialized():
        return [value]
    found: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(found, value)
    return found


def all_reduce_max(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
