"""The transformer: a decoder-only model in plain PyTorch, read top to bottom.

RoPE, RMSNorm, SwiGLU or ReLU^2 MLP, grouped-query attention, optional QK-norm, no biases by default.
Parameter names and the RoPE convention (rotate-half) follow Hugging Face's Llama/Qwen3 so that
export is a one-to-one copy of tensors: `embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`,
`layers.N.mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`,
`lm_head`. Qwen3 adds `q_norm`/`k_norm`, exactly our optional QK-norm.

The open families differ from atomlab's own model in a few switches, all off by default: an explicit
head size (Qwen3-0.6B, Mistral Nemo), q/k/v biases (Qwen2/2.5), RoPE scaling (`linear`, Llama 3.1's
`llama3`, `yarn`), a sliding attention window (Mistral 7B v0.1), layers without RoPE (SmolLM3), and
OLMo 2's layout: the norms on the outputs of attention and MLP (`post_attention_layernorm`,
`post_feedforward_layernorm`) instead of on their inputs, and QK-norm over the whole projection
rather than per head.

The same forward serves training and generation: given a `KVCache`, it continues each row of the cache,
so the generation engine (atomlab.infer.engine) runs these modules, called whole, and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

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
    # what the open families need (atomlab.release.hf); the defaults are atomlab's own architecture
    head_dim: int = 0  # 0: d_model // n_heads
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    qk_norm_scope: str = "head"  # "head": one RMSNorm per head (Qwen3); "projection": over all heads (OLMo 2)
    norm_placement: str = "pre"  # "pre": norms on the inputs of attention and MLP; "post": on their outputs
    rope_scaling: dict | None = None  # {"type": "linear" | "llama3" | "yarn", "factor": ..., ...}, see rope_frequencies
    sliding_window: int = 0  # 0: attend to the whole context; W: to the last W positions, itself included
    nope_layers: list[int] = field(default_factory=list)  # layers without RoPE (SmolLM3: every fourth)
    # embedding and output rows rounded up to a multiple of this (GPU matmuls like multiples of 128); the
    # padding rows start at zero and are never an input nor a logit, and saved weights leave them out
    vocab_multiple: int = 1

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

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


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """RoPE's angular frequency per pair of dimensions, and the factor on cos and sin (YaRN's attention
    scaling, 1 otherwise), computed as transformers' `modeling_rope_utils` does for each scaling type."""
    dim, base = args.head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq, 1.0
    kind, factor = scaling["type"], scaling["factor"]
    if kind == "linear":  # positions interpolated: every frequency slowed by the factor
        return inv_freq / factor, 1.0
    original = scaling["original_max_position_embeddings"]
    if kind == "llama3":
        # wavelengths longer than original / low_freq_factor slow by the factor, shorter than original /
        # high_freq_factor stay, those between blend smoothly (Llama 3.1)
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0
    if kind == "yarn":
        # dimensions that turn more than beta_fast times over the original context keep their frequency,
        # those that turn fewer than beta_slow times are interpolated, a linear ramp between
        def dimension_of(turns: float) -> float:
            return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

        low, high = dimension_of(scaling.get("beta_fast", 32.0)), dimension_of(scaling.get("beta_slow", 1.0))
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        span = (high - low) or 0.001  # as transformers: a ramp of almost no width where the two meet
        ramp = ((torch.arange(dim // 2).float() - low) / span).clamp(0, 1)
        attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp), attention_factor
    raise ValueError(f"RoPE scaling type {kind!r} is not one of linear, llama3, yarn")


def rope_tables(args: ModelArgs, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq, scale = rope_frequencies(args)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq.to(device))
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout, as in HF Llama
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, rope: bool = True) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope = rope  # False: no position information at all in this layer (NoPE)
        self.sliding_window = args.sliding_window
        q_width, kv_width = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.q_proj = nn.Linear(args.d_model, q_width, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.d_model, kv_width, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.d_model, kv_width, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_width, args.d_model, bias=False)
        # QK-norm per head (Qwen3) or over the whole projection (OLMo 2), before RoPE either way
        self.norm_projection = args.qk_norm_scope == "projection"
        q_norm_width, k_norm_width = (q_width, kv_width) if self.norm_projection else (args.head_dim, args.head_dim)
        self.q_norm = RMSNorm(q_norm_width, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(k_norm_width, args.norm_eps) if args.qk_norm else None
        # Inference only, set by the generation engine while it runs the model (copies of weights it keeps),
        # None otherwise: x -> q, k and v side by side in one matrix multiply; per-head QK-norm's weights,
        # q_norm's for each query head then k_norm's for each key head (heads + kv_heads, 1, head_dim)
        self.fused_qkv: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.fused_qk_norm: torch.Tensor | None = None
        self.widths = [q_width, kv_width, kv_width]
        # Set from outside under context parallelism (atomlab.train.context_parallel), None otherwise: a call
        # without a KV cache holds this process's share of each sequence and attends over all of it
        self.context_parallel: Any = None

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (batch, heads, length, head_dim), QK-norm and RoPE applied.
        The generation engine calls this too, around its KV cache."""
        batch, length, _ = x.shape
        if self.fused_qkv is not None and not self.norm_projection:
            return self._project_fused(x, cos, sin)
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv(x).split(self.widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and self.norm_projection:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, length, self.n_heads, self.head_dim)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.norm_projection:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if not self.rope:
            return q, k, v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _project_fused(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """project() as the generation engine runs it, the same numbers in fewer operations: q, k and v from
        one matrix multiply, then the queries and keys normalised per head and rotated together."""
        batch, length, _ = x.shape
        heads = self.n_heads + self.n_kv_heads
        qkv = self.fused_qkv(x).view(batch, length, heads + self.n_kv_heads, self.head_dim).transpose(1, 2)
        qk, v = qkv.split([heads, self.n_kv_heads], dim=1)
        if self.q_norm is not None:  # RMSNorm's weight multiplies the normalised vector: one weight per head
            qk = F.rms_norm(qk, (self.head_dim,), None, self.q_norm.eps) * self.fused_qk_norm
        if self.rope:
            qk = apply_rope(qk, cos, sin)
        return qk[:, : self.n_heads], qk[:, self.n_heads :], v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is not None:  # the cache's mask holds the sliding window, if any
            keys, values = cache.update(k, v)
            out = F.scaled_dot_product_attention(
                q if q.dtype == keys.dtype else q.to(keys.dtype),
                keys,
                values,
                attn_mask=cache.mask,
                is_causal=cache.causal,
                enable_gqa=gqa,
            )
        elif self.context_parallel is not None:  # this process's share of each sequence: keys of all of it
            out = self.context_parallel.attend(q, k, v, self.sliding_window, gqa)
        elif self.sliding_window and length > self.sliding_window:
            # a query sees the keys at most sliding_window - 1 positions back (Mistral's window)
            positions = torch.arange(length, device=x.device)
            back = positions.view(-1, 1) - positions.view(1, -1)
            window = (back >= 0) & (back < self.sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=window, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.kind = args.mlp
        self.gate_proj = nn.Linear(args.d_model, args.hidden, bias=False) if args.mlp == "swiglu" else None
        self.up_proj = nn.Linear(args.d_model, args.hidden, bias=False)
        self.down_proj = nn.Linear(args.hidden, args.d_model, bias=False)
        # Inference only, as Attention.fused_qkv: x -> gate and up side by side in one matrix multiply
        self.fused_gate_up: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.relu(self.up_proj(x)).square())


class Block(nn.Module):
    def __init__(self, args: ModelArgs, index: int = 0) -> None:
        super().__init__()
        self.post_norms = args.norm_placement == "post"
        if not self.post_norms:
            self.input_layernorm = RMSNorm(args.d_model, args.norm_eps)
        self.self_attn = Attention(args, rope=index not in args.nope_layers)
        # pre: the MLP's input norm (Hugging Face's name for it); post: the norm on attention's output
        self.post_attention_layernorm = RMSNorm(args.d_model, args.norm_eps)
        self.mlp = MLP(args)
        if self.post_norms:
            self.post_feedforward_layernorm = RMSNorm(args.d_model, args.norm_eps)
        # Training with train.compile: torch.compile of `layer` (shared by every block, which it takes as an
        # argument, so copies of a model call their own weights), run where there is no KV cache; the
        # generation engine's cached calls, whose shapes change every step, stay eager.
        self.compiled: Callable[..., torch.Tensor] | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        if cache is None and self.compiled is not None:
            return self.compiled(self, x, cos, sin)
        return self.layer(x, cos, sin, cache)

    def layer(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        if self.post_norms:  # OLMo 2: each sublayer's output is normalised before it joins the residual stream
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, cache))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.padded_vocab_size, args.d_model)
        self.layers = nn.ModuleList(Block(args, index) for index in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head = nn.Linear(args.d_model, args.padded_vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # set from outside under context parallelism (atomlab.train.context_parallel): see Attention's
        self.context_parallel: Any = None
        cos, sin = rope_tables(args, args.seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 style: normal(0, std), residual output projections scaled by depth."""
        std = self.args.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(".bias"):
                nn.init.zeros_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.args.n_layers), generator=generator)
            elif name in ("embed_tokens.weight", "lm_head.weight"):  # the same draws with or without padding
                nn.init.normal_(param[: self.args.vocab_size], 0.0, std, generator=generator)
                nn.init.zeros_(param[self.args.vocab_size :])
            else:
                nn.init.normal_(param, 0.0, std, generator=generator)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, head: Callable | None = None
    ) -> torch.Tensor:
        """Logits (batch, length, vocab) for token ids (batch, length). With a KV cache, the tokens continue
        each row of the cache (which keeps their keys and values) and only the last position's logits are
        computed: (batch, 1, vocab). With `head`, returns head(final hidden states, output weight) instead:
        a loss that applies the output projection itself (atomlab.train.loss, a chunk at a time); under
        tensor parallel, whose output projection is sharded by vocabulary, head(whole logits, None)."""
        length = tokens.shape[1]
        split = self.context_parallel if cache is None else None
        if split is not None:  # this process's share of each sequence, at its positions in the whole one
            positions = split.positions(length, tokens.device)
            end = length * split.size
        elif cache is None:
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
        elif split is not None:
            cos, sin = cos[positions], sin[positions]
        else:  # each row at its own positions: (batch, 1, length, head_dim), broadcast over the heads
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        x = self.embed_tokens(tokens)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layer(index))
        if cache is not None:
            cache.advance(length)
            x = x[:, -1:]
        if head is not None:
            if self.lm_head.weight.__class__.__name__ == "DTensor":  # tensor parallel: its logits, gathered whole
                return head(self.lm_head(self.norm(x)), None)
            return head(self.norm(x), self.lm_head.weight)
        logits = self.lm_head(self.norm(x))
        return logits if self.args.vocab_multiple == 1 else logits[..., : self.args.vocab_size]

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
        k, v = (k, v) if k.dtype == keys.dtype else (k.to(keys.dtype), v.to(values.dtype))
        if cache.first_slot is not None:  # every row writes at the same slots (one row, rows of one length)
            keys.narrow(2, cache.first_slot, k.shape[2]).copy_(k)
            values.narrow(2, cache.first_slot, v.shape[2]).copy_(v)
        else:
            slots = cache.write_slots.expand(-1, k.shape[1], -1, k.shape[3])
            keys.scatter_(2, slots, k)
            values.scatter_(2, slots, v)
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
        self.window = args.sliding_window if 0 < args.sliding_window < args.seq_len else 0

    @property
    def slots(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def rows(self, first: int, count: int) -> KVCache:
        view = KVCache.__new__(KVCache)
        view.keys = [k.narrow(0, first, count) for k in self.keys]
        view.values = [v.narrow(0, first, count) for v in self.values]
        view.start, view.lengths = self.start.narrow(0, first, count), self.lengths.narrow(0, first, count)
        view.window = self.window
        return view

    def copy_row(self, source: int, target: int) -> None:
        for tensors in (self.keys, self.values):
            for tensor in tensors:
                tensor[target] = tensor[source]
        self.start[target], self.lengths[target] = self.start[source], self.lengths[source]

    def begin(self, length: int) -> torch.Tensor:
        """Prepare a forward call of `length` tokens per row; their positions (rows, length)."""
        device = self.lengths.device
        # one host sync for every figure the call needs: the highest slot written, whether the rows are
        # aligned, the highest position
        longest, shortest, padded, furthest = torch.stack(
            [self.lengths.max(), self.lengths.min(), self.start.max(), (self.lengths - self.start).max()]
        ).tolist()
        self.end = longest + length
        if self.end > self.slots:
            raise ValueError(f"KV cache: {self.end} slots needed, {self.slots} allocated")
        self.max_position = max(furthest + length - 1, 0)
        slots = self.lengths.unsqueeze(1) + torch.arange(length, device=device)  # (rows, length)
        self.write_slots = slots.view(slots.shape[0], 1, length, 1)
        self.first_slot = longest if shortest == longest else None
        # rows without padding and of one length (one row; RL's samples of one prompt) need no mask: a step
        # sees every slot, a first call is causal; otherwise a query sees its row's slots from the row's
        # start to itself, and a padding query (before the start) itself only, so that its softmax is
        # defined (its output is never used)
        aligned = padded == 0 and shortest == longest
        self.mask, self.causal = None, False
        if aligned and (length == 1 or self.end == length) and not (self.window and self.end > self.window):
            self.causal = length > 1
        else:
            keys = torch.arange(self.end, device=device).view(1, 1, -1)
            query = slots.unsqueeze(2)
            seen = (keys >= self.start.view(-1, 1, 1)) & (keys <= query)
            if self.window:  # a row's slots are its positions, shifted: the window counts slots back
                seen &= query - keys < self.window
            if length > 1:
                seen |= keys == query
            # an additive mask, made once for every layer (sdpa turns a boolean one into this at each call)
            self.mask = torch.where(seen, 0.0, float("-inf")).to(self.keys[0].dtype).unsqueeze(1)
        return (slots - self.start.unsqueeze(1)).clamp_(min=0) if padded else slots

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def advance(self, length: int) -> None:
        self.lengths += length


def count_parameters(model: Transformer) -> dict[str, int]:
    """Unique parameters; `matmul` counts those used in matrix multiplies (the FLOP-relevant set)."""
    args = model.args
    padding = (args.padded_vocab_size - args.vocab_size) * args.d_model  # rows never used: not counted
    heads = 1 if args.tie_embeddings else 2
    total = sum(p.numel() for p in model.parameters()) - heads * padding
    embedding = model.embed_tokens.weight.numel() - padding
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    matmul -= 0 if args.tie_embeddings else padding
    if args.tie_embeddings:
        matmul += embedding  # the tied lm_head is a matmul with the embedding matrix
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "matmul": matmul}


def flops_per_token(args: ModelArgs, params_matmul: int) -> int:
    """Training FLOPs per token: 6 per matmul weight (forward + backward), plus attention
    scores and values, 12 * layers * attention width * context (the PaLM / nanoGPT accounting)."""
    return 6 * params_matmul + 12 * args.n_layers * args.n_heads * args.head_dim * args.seq_len
