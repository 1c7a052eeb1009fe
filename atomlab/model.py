"""The transformer: a decoder-only model in plain PyTorch, read top to bottom.

RoPE, RMSNorm, SwiGLU or ReLU^2 MLP, grouped-query attention, optional QK-norm, no biases.
Parameter names and the RoPE convention (rotate-half) follow Hugging Face's Llama/Qwen3 so that
export is a one-to-one copy of tensors: `embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`,
`layers.N.mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`,
`lm_head`. Qwen3 adds `q_norm`/`k_norm`, exactly our optional QK-norm.

The same forward serves training and generation: given a `KVCache`, it continues each row of the cache,
so the generation engine (atomlab.infer.engine) runs these modules, called whole, and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    mlp: str = "swiglu"  # or "relu2"
    hidden: int = 352
    qk_norm: bool = True
    tie_embeddings: bool = True
    seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        """The architecture from a config.json (extra keys, such as parameter counts, are ignored)."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(args: ModelArgs, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout, as in HF Llama
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.d_model, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.d_model, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (batch, heads, length, head_dim), QK-norm and RoPE applied.
        The generation engine calls this too, around its KV cache."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            keys, values = cache.update(k, v)
            out = F.scaled_dot_product_attention(
                q.to(keys.dtype), keys, values, attn_mask=cache.mask, is_causal=cache.causal, enable_gqa=gqa
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.kind = args.mlp
        self.gate_proj = nn.Linear(args.d_model, args.hidden, bias=False) if args.mlp == "swiglu" else None
        self.up_proj = nn.Linear(args.d_model, args.hidden, bias=False)
        self.down_proj = nn.Linear(args.hidden, args.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.relu(self.up_proj(x)).square())


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.d_model, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.d_model, args.norm_eps)
        self.mlp = MLP(args)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(args, args.seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 style: normal(0, std), residual output projections scaled by depth."""
        std = self.args.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.args.n_layers), generator=generator)
            else:
                nn.init.normal_(param, 0.0, std, generator=generator)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (batch, length, vocab) for token ids (batch, length). With a KV cache, the tokens continue
        each row of the cache (which keeps their keys and values) and only the last position's logits are
        computed: (batch, 1, vocab)."""
        length = tokens.shape[1]
        if cache is None:
            positions = None
            end = length
        else:
            positions = cache.begin(length)
            end = cache.max_position + 1
        if end > self.rope_cos.shape[0]:
            cos, sin = rope_tables(self.args, end, tokens.device)
        else:
            cos, sin = self.rope_cos, self.rope_sin
        if positions is None:
            cos, sin = cos[:length], sin[:length]
        else:  # each row at its own positions: (batch, 1, length, head_dim), broadcast over the heads
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        x = self.embed_tokens(tokens)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layer(index))
        if cache is not None:
            cache.advance(length)
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


class LayerCache:
    """One layer's view of a KVCache during one forward call."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (batch, kv_heads, length, head_dim) at each row's next slots; return
        the keys and values of every slot up to the newest."""
        cache = self.cache
        keys, values = cache.keys[self.index], cache.values[self.index]
        slots = cache.write_slots.expand(-1, k.shape[1], -1, k.shape[3])
        keys.scatter_(2, slots, k.to(keys.dtype))
        values.scatter_(2, slots, v.to(values.dtype))
        return keys.narrow(2, 0, cache.end), values.narrow(2, 0, cache.end)

    @property
    def mask(self) -> torch.Tensor | None:
        """The attention mask of this call (batch, 1, length, slots), None when every slot is seen or causal."""
        return self.cache.mask

    @property
    def causal(self) -> bool:
        return self.cache.causal


class KVCache:
    """Keys and values of the rows being decoded, per layer (rows, kv_heads, slots, head_dim), for
    `Transformer.forward(tokens, cache)`. Each row has its own length (slots written) and start (its first
    slot: those before are left padding, never attended to), so rows of different lengths share one batch
    and each keeps the positions and attention it would have alone. A forward call writes its tokens at
    each row's next slots, attends over the row's own slots (causally) and advances every row's length.

    `rows(first, count)` is a view of some rows sharing the storage (a forward on it touches only them), so
    a decoding batch can grow and shrink without copying what it keeps."""

    def __init__(
        self, args: ModelArgs, rows: int, slots: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        shape = (rows, args.n_kv_heads, slots, args.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.start = torch.zeros(rows, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def rows(self, first: int, count: int) -> KVCache:
        view = KVCache.__new__(KVCache)
        view.keys = [k.narrow(0, first, count) for k in self.keys]
        view.values = [v.narrow(0, first, count) for v in self.values]
        view.start, view.lengths = self.start.narrow(0, first, count), self.lengths.narrow(0, first, count)
        return view

    def copy_row(self, source: int, target: int) -> None:
        for tensors in (self.keys, self.values):
            for tensor in tensors:
                tensor[target] = tensor[source]
        self.start[target], self.lengths[target] = self.start[source], self.lengths[source]

    def begin(self, length: int) -> torch.Tensor:
        """Prepare a forward call of `length` tokens per row; their positions (rows, length)."""
        device = self.lengths.device
        slots = self.lengths.unsqueeze(1) + torch.arange(length, device=device)  # (rows, length)
        self.end = int(slots.max()) + 1
        if self.end > self.slots:
            raise ValueError(f"KV cache: {self.end} slots needed, {self.slots} allocated")
        self.write_slots = slots.view(slots.shape[0], 1, length, 1)
        # rows without padding and of one length (one row; RL's samples of one prompt) need no mask: a step
        # sees every slot, a first call is causal; otherwise a query sees its row's slots from the row's
        # start to itself, and a padding query (before the start) itself only, so that its softmax is
        # defined (its output is never used)
        aligned = not bool(self.start.any()) and bool((self.lengths == self.lengths[0]).all())
        self.mask, self.causal = None, False
        if aligned and (length == 1 or self.end == length):
            self.causal = length > 1
        else:
            keys = torch.arange(self.end, device=device).view(1, 1, -1)
            query = slots.unsqueeze(2)
            self.mask = (((keys >= self.start.view(-1, 1, 1)) & (keys <= query)) | (keys == query)).unsqueeze(1)
        positions = (slots - self.start.unsqueeze(1)).clamp(min=0)
        self.max_position = int(positions.max())
        return positions

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def advance(self, length: int) -> None:
        self.lengths += length


def count_parameters(model: Transformer) -> dict[str, int]:
    """Unique parameters; `matmul` counts those used in matrix multiplies (the FLOP-relevant set)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if model.args.tie_embeddings:
        matmul += embedding  # the tied lm_head is a matmul with the embedding matrix
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "matmul": matmul}


def flops_per_token(args: ModelArgs, params_matmul: int) -> int:
    """Training FLOPs per token: 6 per matmul weight (forward + backward), plus attention
    scores and values, 12 * layers * width * context (the PaLM / nanoGPT accounting)."""
    return 6 * params_matmul + 12 * args.n_layers * args.d_model * args.seq_len
