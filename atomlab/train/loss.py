"""The next-token loss, computed a chunk of positions at a time so that the fp32 logits of the whole
batch x sequence x vocabulary never exist at once (at 8 x 4,096 tokens and a 128k vocabulary they would
take 17 GB): each chunk projects its hidden states onto the vocabulary, takes its cross-entropy (and
z-loss) sum and drops the logits; in backward each chunk recomputes its own logits (activation
checkpointing per chunk), so backward stays chunked too. A batch that fits in one chunk takes the plain
path, the same operations as an unchunked loss, so small runs are bitwise unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # targets without loss (prompt tokens in SFT)


def _chunk_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int, z_loss: float, reduction: str = "sum"
) -> torch.Tensor:
    """Cross-entropy (nats) of one chunk of positions (hidden: tokens x d_model), plus z_loss times the
    squared log-partition (PaLM's z-loss, which keeps the softmax normaliser near 1), summed or averaged
    over the scored positions."""
    logits = hidden if weight is None else F.linear(hidden, weight)  # None: hidden are the logits already
    if logits.shape[-1] != vocab:  # padding rows of a padded vocabulary: never a prediction
        logits = logits[..., :vocab]
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, reduction=reduction)
    if z_loss:
        squared = torch.logsumexp(logits[targets != IGNORE], dim=-1) ** 2
        loss = loss + z_loss * (squared.sum() if reduction == "sum" else squared.mean())
    return loss


def chunked_head(targets: torch.Tensor, vocab: int, chunk_tokens: int, z_loss: float = 0.0, reduction: str = "mean"):
    """The `head` for Transformer.forward: (hidden states, output weight) -> the loss on `targets`
    (batch, length), `reduction` "mean" (over scored tokens) or "sum";
    (logits, None) under tensor parallel."""
    flat_targets = targets.reshape(-1)

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        tokens = flat.shape[0]
        if weight is None or chunk_tokens <= 0 or tokens <= chunk_tokens:  # one chunk: the unchunked operations
            return _chunk_loss(flat, weight, flat_targets, vocab, z_loss, reduction)
        total = None
        for start in range(0, tokens, chunk_tokens):
            piece = (flat[start : start + chunk_tokens], weight, flat_targets[start : start + chunk_tokens])
            if torch.is_grad_enabled():
                part = checkpoint(_chunk_loss, *piece, vocab, z_loss, use_reentrant=False)
            else:
                part = _chunk_loss(*piece, vocab, z_loss)
            total = part if total is None else total + part
        if reduction == "sum":
            return total
        return total / (flat_targets != IGNORE).sum()

    return head
