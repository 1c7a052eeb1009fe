"""The transformer: a decoder-only model in plain PyTorch, read top to bottom.

RoPE, RMSNorm, SwiGLU or ReLU^2 MLP, grouped-query attention, optional QK-norm, no biases.
Parameter names and the RoPE convention (rotate-half) follow Hugging Face's Llama/Qwen3 so that
export is a one-to-one copy of tensors: `embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`,
`layers.N.mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`,
`lm_head`. Qwen3 adds `q_norm`/`k_norm`, exactly our optional QK-norm.
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, length, vocab) for token ids (batch, length)."""
        length = tokens.shape[1]
        if length > self.rope_cos.shape[0]:
            cos, sin = rope_tables(self.args, length, tokens.device)
        else:
            cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.8,
        top_k: int = 50,
        generator: torch.Generator | None = None,
        stop_token: int | None = None,
    ) -> list[int]:
        """Plain sampling for training-time samples; the serving engine lives in atomlab.infer."""
        device = self.embed_tokens.weight.device
        tokens = torch.tensor([prompt], device=device)
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.args.seq_len :])[0, -1].float()
            if temperature <= 0:
                next_token = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1).cpu()
                next_token = int(torch.multinomial(probs, 1, generator=generator))
            if next_token == stop_token:
                break
            tokens = torch.cat([tokens, torch.tensor([[next_token]], device=device)], dim=1)
        return tokens[0, len(prompt) :].tolist()


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
