"""Parallelism applied from outside a plain model, as torchtitan does, under torchrun.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` joins the process group (gloo on CPU,
NCCL on GPU). `parallelize()` then applies activation checkpointing, torch.compile and the layout
of `train.parallel` (atomlab.train.parallel): DDP on the plain model, or a sharded twin of it on a
device mesh (FSDP2, HSDP, tensor + sequence parallel), keeping its parameter names, so checkpoints
and the release format are the same in every layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from atomlab.model import Transformer
from atomlab.train.parallel import Layout, shard_model, speed_features


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    tp: int = 1  # processes per tensor-parallel group: they see the same rows of the batch
    cp: int = 1  # processes per context-parallel group: the same rows too, each a share of every sequence

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """This process's place among the data-parallel ones (which rows of the batch it takes)."""
        return self.rank // (self.tp * self.cp)

    @property
    def data_size(self) -> int:
        return self.size // (self.tp * self.cp)

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
    layout: Layout,
    device: torch.device,
    compile: bool,
    activation_checkpointing: bool | str,
) -> tuple[Transformer, nn.Module]:
    """Apply the speed and parallelism features. Returns the model to train (the plain one itself, or its
    sharded twin on the device mesh) and the module to call for training (DDP-wrapped where DDP runs)."""
    if not world.distributed or layout.plain_ddp:
        model.to(device)
        speed_features(model, activation_checkpointing, compile)
        if not world.distributed:
            return model, model
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model, ddp
    sharded = shard_model(model, layout, device, activation_checkpointing, compile)
    return sharded, sharded


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
