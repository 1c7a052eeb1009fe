"""Context parallelism: every sequence of a batch split over the `cp` processes of a group, so that each holds
the activations of 1/cp of it, for sequences too long for one device's memory.

A sequence of L positions is cut into 2 x cp equal pieces, and process c of the group takes pieces c and
2cp - 1 - c: under a causal mask early queries see few keys and late ones many, so one early and one late
piece give each process the same attention work (the load balancing of Megatron-LM and of torch's
`context_parallel`). Everything but attention is position-wise and runs on the process's own tokens; RoPE
takes their true positions. Attention gathers the keys and values of the whole sequence from the group (an
all-gather, whose backward sums the gradients back to the process that owns each piece: a reduce-scatter on
NCCL, an all-reduce on gloo, which has none) and masks by true position, as Llama 3's context parallelism
does. torch's own `context_parallel` (ring attention over DTensor) covers only the CUDA attention kernels;
this runs wherever torch.distributed does, gloo on CPU included.

The loss of each process is its share of the mean over the whole rows (`mean_share`), so data-parallel
averaging over dp x cp processes gives exactly the loss of one process over the same rows.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from atomlab.errors import AtomlabError
from atomlab.model import Transformer
from atomlab.train.loss import IGNORE


class ContextParallel:
    """This process's share of each sequence in a cp group, and the collectives attention needs across it."""

    def __init__(self, group: Any, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    @functools.lru_cache(maxsize=16)  # noqa: B019 (one instance per model, a handful of lengths)
    def _positions(self, rank: int, local: int, device: torch.device) -> torch.Tensor:
        piece = local // 2
        late = 2 * self.size - 1 - rank
        return torch.cat(
            [torch.arange(rank * piece, (rank + 1) * piece), torch.arange(late * piece, (late + 1) * piece)]
        ).to(device)

    def positions(self, local: int, device: torch.device) -> torch.Tensor:
        """The positions in the whole sequence of this process's `local` tokens, in the order it holds them."""
        if local % 2:
            raise ValueError(f"context parallel: a process's share of a sequence is two equal pieces, not {local}")
        return self._positions(self.rank, local, device)

    @functools.lru_cache(maxsize=16)  # noqa: B019
    def mask(self, local: int, device: torch.device, window: int = 0) -> torch.Tensor:
        """Which gathered keys each local query sees (local, cp x local): those at its position or before (and
        fewer than `window` back, for a sliding window), by true position."""
        queries = self.positions(local, device).view(-1, 1)
        keys = torch.cat([self._positions(rank, local, device) for rank in range(self.size)]).view(1, -1)
        seen = keys <= queries
        if window:
            seen &= queries - keys < window
        return seen

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's share of (batch, length) rows: its positions' columns."""
        length = rows.shape[1]
        if length % (2 * self.size):
            raise AtomlabError(
                f"context parallel: rows of {length} tokens do not split into {2 * self.size} equal pieces; make "
                f"the row length (model.seq_len, sft.pack_length) a multiple of {2 * self.size}"
            )
        return rows.index_select(1, self.positions(length // self.size, rows.device))

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every process's `tensor` concatenated along `dim` in rank order, gradients flowing back to each."""
        return _GatherPieces.apply(tensor, self, dim)

    def mean_share(self, loss_sum: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """cp x this process's summed loss / the scored tokens of the whole rows: averaged over the group's
        processes (as data-parallel gradient averaging does) it is the mean loss over the whole rows."""
        scored = (targets != IGNORE).sum().to(torch.float64)
        dist.all_reduce(scored, group=self.group)
        return loss_sum * self.size / scored.to(loss_sum.dtype)


class _GatherPieces(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, split: ContextParallel, dim: int) -> torch.Tensor:
        ctx.split, ctx.dim = split, dim
        parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(split.size)]
        dist.all_gather(parts, tensor.contiguous(), group=split.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        split, dim = ctx.split, ctx.dim
        if dist.get_backend(split.group) == "nccl":  # each process receives the sum for its own piece only
            whole = grad.movedim(dim, 0).contiguous()
            mine = whole.new_empty((whole.shape[0] // split.size, *whole.shape[1:]))
            dist.reduce_scatter_tensor(mine, whole, group=split.group)
            return mine.movedim(0, dim), None, None
        whole = grad.contiguous().clone()  # gloo has no reduce-scatter: the whole sum, then this piece of it
        dist.all_reduce(whole, group=split.group)
        local = whole.shape[dim] // split.size
        return whole.narrow(dim, split.rank * local, local), None, None


def apply_context_parallel(model: Transformer, cp_mesh: Any) -> None:
    """Make the model's calls without a KV cache take this process's share of each sequence (the generation
    engine's cached calls, for samples and held-out accuracy, still run whole sequences)."""
    split = ContextParallel(cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size())
    model.context_parallel = split
    for block in model.layers:
        block.self_attn.context_parallel = split


def context_split(net: torch.nn.Module) -> ContextParallel | None:
    """The context-parallel split of a model being trained (DDP keeps the model as .module), or None."""
    return getattr(getattr(net, "module", net), "context_parallel", None)
