"""Context parallelism: every sequence of a batch split over the `cp` processes of a group, so that each holds
the activations of 1/cp of it, for sequences too long for one device's memory.

A sequence of L positions is cut into 2 x cp equal pieces, and process c of the group takes pieces c and
2cp - 1 - c: under a causal mask early queries see few keys and late ones many, so one early and one late
piece give each process the same attention work (the load balancing of Megatron-LM and of torch's
`context_parallel`). Everything but attention is position-wise and runs on the process's own tokens; RoPE
takes their true positions. Attention gathers the keys and values of the whole sequence from the group (an
all-gather, whose backward sums the gradients back to the process that owns each piece: a reduce-scatter on
NCCL, an all-reduce on gloo, which has none), as Llama 3's context parallelism does; each piece attends
over the keys up to its own last position only, masked by true position. torch's own `context_parallel`
(ring attention over DTensor) covers only the CUDA attention kernels; this runs wherever torch.distributed
does, gloo on CPU included.

The loss of each process is its share of the mean over the whole rows (`mean_share`), so data-parallel
averaging over dp x cp processes gives exactly the loss of one process over the same rows.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from atomlab.errors import AtomlabError
from atomlab.model import Transformer
from atomlab.train.loss import IGNORE


class ContextParallel:
    """This process's share of each sequence in a cp group, and the collectives attention needs across it."""

    def __init__(self, group: Any, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    def piece_starts(self, local: int) -> tuple[int, int]:
        """Where this process's two pieces (of local / 2 tokens each) start in the whole sequence."""
        piece = local // 2
        return self.rank * piece, (2 * self.size - 1 - self.rank) * piece

    @functools.lru_cache(maxsize=16)  # noqa: B019 (one instance per model, a handful of lengths)
    def positions(self, local: int, device: torch.device) -> torch.Tensor:
        """The positions in the whole sequence of this process's `local` tokens, in the order it holds them."""
        if local % 2:
            raise ValueError(f"context parallel: a process's share of a sequence is two equal pieces, not {local}")
        piece = local // 2
        return torch.cat([torch.arange(start, start + piece) for start in self.piece_starts(local)]).to(device)

    @functools.lru_cache(maxsize=16)  # noqa: B019
    def _pieces(
        self, local: int, device: torch.device, dtype: torch.dtype, window: int
    ) -> list[tuple[slice, int, int, torch.Tensor]]:
        """For each of this process's two pieces: its queries (a slice of the local tokens), the keys it can see
        (a range of the whole sequence: from the first a sliding window reaches, to its own last) and an additive
        mask of which of them each query sees (at its position or before, fewer than `window` back). The mask
        is made once, in the attention's dtype: SDPA would turn a boolean one into this at every call."""
        piece, pieces = local // 2, []
        for index, first_query in enumerate(self.piece_starts(local)):
            end = first_query + piece
            mine = torch.arange(first_query, end, device=device).view(-1, 1)
            start = max(0, first_query - window + 1) if window else 0
            keys = torch.arange(start, end, device=device).view(1, -1)
            seen = keys <= mine
            if window:
                seen &= mine - keys < window
            mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))
            pieces.append((slice(index * piece, (index + 1) * piece), start, end, mask))
        return pieces

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, gqa: bool) -> torch.Tensor:
        """Causal attention of this process's queries (batch, heads, local, head_dim) over the keys and values of
        the whole sequence, gathered from the group. Each piece attends only over the keys up to its own last
        position (an early piece over few), so the group does 1 + 1/(2 cp) times the work of one causal pass,
        not the 2x of every query against every key."""
        keys, values = self.gather(k, dim=2), self.gather(v, dim=2)
        outputs = []
        for queries, start, end, mask in self._pieces(q.shape[2], q.device, q.dtype, window):
            outputs.append(
                F.scaled_dot_product_attention(
                    q[:, :, queries], keys[:, :, start:end], values[:, :, start:end], attn_mask=mask, enable_gqa=gqa
                )
            )
        return torch.cat(outputs, dim=2)

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
        """The whole sequence of `tensor` (this process's share along `dim`) from every process of the group, in
        position order; gradients flow back to the process that holds each piece."""
        return _GatherPieces.apply(tensor, self, dim)

    def mean_share(self, loss_sum: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """cp x this process's summed loss / the scored tokens of the whole rows: averaged over the group's
        processes (as data-parallel gradient averaging does) it is the mean loss over the whole rows."""
        scored = (targets != IGNORE).sum().to(torch.float64)
        dist.all_reduce(scored, group=self.group)
        return loss_sum * self.size / scored.to(loss_sum.dtype)


class _GatherPieces(torch.autograd.Function):
    """All-gather of each process's two pieces, put in position order (pieces 0, 1, ..., 2cp - 1: the first
    halves of ranks 0..cp-1, then the second halves of ranks cp-1..0)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, split: ContextParallel, dim: int) -> torch.Tensor:
        ctx.split, ctx.dim = split, dim
        parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(split.size)]
        dist.all_gather(parts, tensor.contiguous(), group=split.group)
        halves = [part.chunk(2, dim) for part in parts]
        return torch.cat([early for early, _ in halves] + [late for _, late in reversed(halves)], dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        split, dim = ctx.split, ctx.dim
        pieces = grad.chunk(2 * split.size, dim)  # back in rank order: each rank's early and late piece
        by_rank = torch.cat([p for rank in range(split.size) for p in (pieces[rank], pieces[-1 - rank])], dim=dim)
        if dist.get_backend(split.group) == "nccl":  # each process receives the sum for its own pieces only
            whole = by_rank.movedim(dim, 0).contiguous()
            mine = whole.new_empty((whole.shape[0] // split.size, *whole.shape[1:]))
            dist.reduce_scatter_tensor(mine, whole, group=split.group)
            return mine.movedim(0, dim), None, None
        dist.all_reduce(by_rank, group=split.group)  # gloo has no reduce-scatter: the whole sum, then this share
        local = by_rank.shape[dim] // split.size
        return by_rank.narrow(dim, split.rank * local, local), None, None


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
