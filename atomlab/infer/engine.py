"""The generation engine: one batched sampler with a KV cache, used by chat, the server, evaluation and RL.

A batch holds prompts of different lengths, left-padded to the longest. Every row keeps its own
RoPE positions (slot minus its padding) and an attention mask that hides the padding, so a row
gives the same tokens in any batch as alone. Keys and values live in a cache preallocated per
layer for the whole batch; after the prompt (prefill) each step feeds one token per row. A row
that finishes is removed from the batch (its cache rows dropped), so it costs nothing more.

The cached forward is written here from the model's weights, so that atomlab/model.py keeps a single
training path. The engine keeps its own copies of the matrices, remade whenever a parameter changes:
the projections that read the same input side by side (q, k and v in one matrix, gate and up in
another), laid out (in, out) for `torch.mm` and, on CPU, also packed for oneDNN, used from a few rows
up (a batch, a prompt). Outside attention, prefill works on the prompt tokens only, not the padding.
Sampling is temperature, then top-k, then top-p, as an inverse-CDF draw over the tokens sorted from the
most likely, with one `torch.Generator` per request that draws one uniform per token: a request's
tokens depend only on its seed and its own logits. Only the top-k (or, with top-k off, the 64 most
likely tokens) are sorted, unless the draw lands beyond them. Text is decoded incrementally, never
split inside a UTF-8 character, and text that could be the start of a stop string is held back until
it cannot.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from atomlab.errors import AtomlabError
from atomlab.model import ModelArgs, Transformer, rope_tables
from atomlab.tokenizer import END_OF_TEXT, END_OF_TURN, render_chat


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings: generation ends before them, text excludes them
    stop_token_ids: list[int] = field(default_factory=list)  # plus the model's eos (<|endoftext|>) and <|end|>
    seed: int | None = None  # per-request seed: same seed + same prompt -> same output, whatever else is in the batch


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    # streaming: called with each new piece of text (never split inside a UTF-8 character, never part of a stop string)
    on_text: Callable[[str], None] | None = None


@dataclass
class Completion:
    text: str  # the decoded completion, ending before a stop string or stop token
    token_ids: list[int]  # every sampled token, including the stop token or the tokens of a stop string
    finish_reason: str  # "stop" (stop token or string) or "length" (max_tokens or the end of the context)
    prompt_tokens: int
    completion_tokens: int


class _Sequence:
    """One request being decoded: its tokens, its random generator, its text and what was streamed."""

    def __init__(self, request: Request, budget: int, stop_token_ids: set[int], tokenizer: tokenizers.Tokenizer):
        self.request = request
        self.params = request.params
        self.budget = budget  # tokens it may still sample: max_tokens, capped at the context end
        self.stop_token_ids = stop_token_ids
        self.tokenizer = tokenizer
        self.generator = torch.Generator()
        if self.params.seed is None:
            self.generator.seed()  # non-deterministic
        else:
            self.generator.manual_seed(self.params.seed)
        # one uniform per sampled token, drawn up front: the same numbers as one draw per step
        self.uniforms = torch.rand(budget, generator=self.generator) if self.params.temperature > 0 else None
        self.token_ids: list[int] = []
        self.text = ""  # decoded text so far, whole characters only
        self.streamed = 0  # characters of text already passed to on_text
        # incremental decoding window (as in Hugging Face TGI): text is the decode of ids[prefix:]
        # minus the decode of ids[prefix:read], so decoders that depend on context stay correct
        self.prefix_offset = 0
        self.read_offset = 0
        self.finish_reason: str | None = None if budget > 0 else "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token: int) -> None:
        self.token_ids.append(token)
        if token in self.stop_token_ids:
            self._decode_new_text(self.token_ids[:-1], final=True)  # the stop token has no text
            self._finish("stop")
            return
        out_of_budget = len(self.token_ids) >= self.budget
        self._decode_new_text(self.token_ids, final=out_of_budget)
        if self._cut_at_stop_string():
            self.finish_reason = "stop"
        elif out_of_budget:
            self._finish("length")
        else:
            self._stream_until(len(self.text) - self._possible_stop_prefix())

    def completion(self) -> Completion:
        return Completion(
            text=self.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.request.prompt),
            completion_tokens=len(self.token_ids),
        )

    def _decode_new_text(self, ids: list[int], final: bool) -> None:
        prefix_text = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(ids[self.prefix_offset :])
        # a trailing U+FFFD is (almost always) a UTF-8 character whose last bytes are still to come
        if final or (len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)

    def _cut_at_stop_string(self) -> bool:
        # Text before `streamed` was checked when it was streamed and cannot begin a stop string.
        starts = [i for stop in self.params.stop if (i := self.text.find(stop, self.streamed)) >= 0]
        if not starts:
            return False
        self.text = self.text[: min(starts)]
        self._stream_until(len(self.text))
        return True

    def _possible_stop_prefix(self) -> int:
        """Length of the longest tail of the unstreamed text that a stop string begins with."""
        tail = self.text[self.streamed :]
        longest = 0
        for stop in self.params.stop:
            for size in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _finish(self, reason: str) -> None:
        if self._cut_at_stop_string():
            reason = "stop"
        self._stream_until(len(self.text))
        self.finish_reason = reason

    def _stream_until(self, end: int) -> None:
        if end > self.streamed:
            piece, self.streamed = self.text[self.streamed : end], end
            if self.request.on_text is not None:
                self.request.on_text(piece)


@dataclass
class _KVCache:
    """Keys and values of a batch being decoded: (batch, kv_heads, capacity, head_dim) per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    padding: torch.Tensor  # (batch,) left-padding slots of each row
    visible: torch.Tensor  # (batch, 1, 1, capacity): the slots that are not padding, a decode step's attention mask
    length: int  # slots written so far (the same for every row)

    @torch.inference_mode()
    def keep_rows(self, rows: torch.Tensor) -> None:
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.padding = self.padding.index_select(0, rows)
        self.visible = self.visible.index_select(0, rows)


# oneDNN's packed matmul (where there is one) beats torch.mm from this many rows and multiply-adds;
# below, its fixed cost (about 13 us a call) is more than it saves
_ONEDNN_ROWS = 4
_ONEDNN_MACS = 2**21


class _Matrix:
    """x @ weight.T for a weight (out, in), kept (in, out) for `torch.mm` (the default BLAS, best for a
    row or two, or a small matrix). On CPU in fp32 it is also packed for oneDNN, used for products large
    enough (1.3x faster at 16 rows of the tiny model), which gives a row the same numbers whatever the
    number of rows."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.t = weight.t().contiguous()
        self.packed = _onednn_pack(weight)
        self.onednn_rows = max(_ONEDNN_ROWS, -(-_ONEDNN_MACS // weight.numel()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.shape[0] < self.onednn_rows:
            return torch.mm(x, self.t)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not _onednn_works():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)  # a layout for 16 rows, right for any number


@functools.cache
def _onednn_works() -> bool:
    """Whether this torch build has oneDNN's packed linear and it computes F.linear (checked once)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        with torch.inference_mode():
            weight, x = torch.randn(24, 40), torch.randn(3, 40)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            return torch.allclose(out, F.linear(x, weight), rtol=1e-4, atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@dataclass
class _Layer:
    """One block's weights as the cached forward uses them, the projections that read the same input
    side by side, so that each is one matrix multiply."""

    attention_norm: torch.Tensor
    qkv: _Matrix  # q_proj, k_proj, v_proj
    qk_norm: torch.Tensor | None  # (heads + kv_heads, head_dim): q_norm's weight per query head, k_norm's per kv head
    o: _Matrix
    mlp_norm: torch.Tensor
    gate_up: _Matrix  # gate_proj then up_proj (SwiGLU), or up_proj alone (ReLU^2)
    down: _Matrix


@dataclass
class _Weights:
    layers: list[_Layer]
    lm_head: _Matrix


def _decode_weights(model: Transformer) -> _Weights:
    def fused(*linears: torch.nn.Linear) -> _Matrix:
        return _Matrix(torch.cat([linear.weight for linear in linears]))

    layers = []
    for block in model.layers:
        attention, mlp = block.self_attn, block.mlp
        qk_norm = None
        if attention.q_norm is not None:
            qk_norm = torch.cat(
                [
                    attention.q_norm.weight.expand(attention.n_heads, -1),
                    attention.k_norm.weight.expand(attention.n_kv_heads, -1),
                ]
            )
        gate_up = (mlp.gate_proj, mlp.up_proj) if mlp.gate_proj is not None else (mlp.up_proj,)
        layers.append(
            _Layer(
                attention_norm=block.input_layernorm.weight.detach(),
                qkv=fused(attention.q_proj, attention.k_proj, attention.v_proj),
                qk_norm=qk_norm,
                o=fused(attention.o_proj),
                mlp_norm=block.post_attention_layernorm.weight.detach(),
                gate_up=fused(*gate_up),
                down=fused(mlp.down_proj),
            )
        )
    return _Weights(layers, _Matrix(model.lm_head.weight.detach()))


def _refuse_unsupported_layout(args: ModelArgs) -> None:
    """The cached forward above knows atomlab's own layout, an explicit head size and RoPE scaling; for the
    rest of what imported families bring it would compute wrong logits, so it says so instead."""
    unsupported = [
        name
        for name, present in (
            ("q/k/v biases (model.qkv_bias)", args.qkv_bias),
            ("QK-norm over the whole projection (model.qk_norm_scope)", args.qk_norm and args.qk_norm_scope != "head"),
            ("norms on the sublayer outputs (model.norm_placement)", args.norm_placement != "pre"),
            ("a sliding attention window (model.sliding_window)", 0 < args.sliding_window < args.seq_len),
            ("layers without RoPE (model.nope_layers)", bool(args.nope_layers)),
        )
        if present
    ]
    if unsupported:
        raise AtomlabError(f"the generation engine does not support {', '.join(unsupported)} yet")


def _weights_version(model: Transformer) -> list | None:
    """What changes when a parameter is replaced or written in place (its version counter); None when that
    cannot be told (parameters made under inference mode have no version counter). Walks the modules
    itself: half the time of model.parameters(), which is paid at every generate call."""
    version, modules = [], [model]
    try:
        while modules:
            module = modules.pop()
            version += [(p.data_ptr(), p.dtype, p._version) for p in module._parameters.values() if p is not None]
            modules += [child for child in module._modules.values() if child is not None]
    except RuntimeError:
        return None
    return version


# With top-k off, the most likely tokens are taken sorted and the draw is made among them whenever it
# lands there (it almost always does): the whole vocabulary is sorted only for the other draws.
_HEAD = 64


@dataclass
class _Group:
    """Sampled rows with the same top-k, and their settings as columns."""

    rows: torch.Tensor | None  # the rows of the batch (None: every row, in order)
    top_k: int  # 0: the whole vocabulary
    temperature: torch.Tensor  # (rows, 1)
    top_p: torch.Tensor | None  # (rows, 1); None when every row keeps all (top_p 1)
    uniforms: torch.Tensor  # (rows, draws): each row's uniforms, one per step


class _Sampler:
    """The next token of each live row: argmax where temperature is 0, otherwise a draw after
    temperature, top-k and top-p, using the row's own uniform for this step (so its draws do not
    depend on the batch). Made once for a set of live rows."""

    def __init__(self, sequences: list[_Sequence], vocab: int, device: torch.device) -> None:
        sampled = [i for i, sequence in enumerate(sequences) if sequence.uniforms is not None]
        self.rows = len(sequences)
        self.greedy = len(sampled) < len(sequences)
        by_top_k: dict[int, list[int]] = {}
        for i in sampled:
            top_k = sequences[i].params.top_k
            by_top_k.setdefault(top_k if top_k < vocab else 0, []).append(i)
        self.groups = []
        for top_k, rows in by_top_k.items():
            params = [sequences[i].params for i in rows]
            uniforms = pad_sequence([sequences[i].uniforms for i in rows], batch_first=True)
            self.groups.append(
                _Group(
                    rows=None if len(rows) == self.rows else torch.tensor(rows, device=device),
                    top_k=top_k,
                    temperature=torch.tensor([[p.temperature] for p in params], device=device),
                    top_p=None
                    if all(p.top_p >= 1 for p in params)
                    else torch.tensor([[p.top_p] for p in params], device=device),
                    uniforms=uniforms.to(device),
                )
            )

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Token ids (rows,) from logits (rows, vocab), for the step-th token of every row."""
        if not self.groups:
            return logits.argmax(dim=-1)
        tokens = logits.argmax(dim=-1) if self.greedy else None
        for group in self.groups:
            scaled = (logits if group.rows is None else logits.index_select(0, group.rows)) / group.temperature
            drawn = _draw(scaled, group.top_k, group.top_p, group.uniforms[:, step : step + 1])
            if group.rows is None:
                return drawn
            if tokens is None:
                tokens = torch.empty(self.rows, dtype=drawn.dtype, device=drawn.device)
            tokens.index_copy_(0, group.rows, drawn)
        return tokens


def _draw(scaled: torch.Tensor, top_k: int, top_p: torch.Tensor | None, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of scaled logits (rows, vocab): the tokens sorted from the most likely, the
    first top_k kept (all when 0), then the first whose mass reaches top_p (the first always stays);
    the token is where `uniform` (rows, 1) falls in the cumulative mass of those kept."""
    vocab = scaled.shape[-1]
    if top_k == 0 and vocab > _HEAD:
        return _draw_from_head(scaled, top_p, uniform)
    values, order = scaled.topk(top_k, dim=-1) if 0 < top_k < vocab else scaled.sort(dim=-1, descending=True)
    cumulative, _ = _top_p(values.softmax(dim=-1), top_p)
    choice = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return order.gather(1, choice.clamp(max=order.shape[1] - 1)).squeeze(1)


def _draw_from_head(scaled: torch.Tensor, top_p: torch.Tensor | None, uniform: torch.Tensor) -> torch.Tensor:
    """_draw over the whole vocabulary, sorting only the _HEAD most likely tokens for the rows whose
    draw lands among them and whose top-p (if any) ends among them."""
    probs = scaled.softmax(dim=-1)
    head, order = probs.topk(_HEAD, dim=-1)
    cumulative, cut = _top_p(head, top_p)
    total = probs.sum(dim=-1, keepdim=True)  # every token is kept
    if cut is not None:
        inside = cut[:, -1:]  # top-p ends inside the head: the tokens it keeps are all there
        total = torch.where(inside, cumulative[:, -1:], total)
    choice = torch.searchsorted(cumulative, uniform * total, right=True)
    tokens = order.gather(1, choice.clamp(max=_HEAD - 1)).squeeze(1)
    rest = choice >= _HEAD
    if cut is not None:
        rest |= (top_p < 1) & ~inside  # top-p keeps tokens past the head, whose order is not known
    if rest.any():
        rows = rest.squeeze(1).nonzero().squeeze(1)
        kept = None if top_p is None else top_p.index_select(0, rows)
        tokens[rows] = _draw(scaled.index_select(0, rows), scaled.shape[-1], kept, uniform.index_select(0, rows))
    return tokens


def _top_p(probs: torch.Tensor, top_p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cumulative mass of probs (rows, sorted from the most likely) once top-p has cut the tail, and the
    tokens it cut (None without top-p): those after the mass before them reached top_p."""
    cumulative = probs.cumsum(dim=-1)
    if top_p is None:
        return cumulative, None
    cut = (cumulative - probs >= top_p) & (top_p < 1)
    return probs.masked_fill(cut, 0.0).cumsum(dim=-1), cut


class Engine:
    """Batched generation from a Transformer and its tokenizer. Not thread-safe: one generate at a time.

    The engine runs the model it is given (a trainer's updated weights are used by the next call: the
    engine's copies of the matrices, the model's size again, twice on CPU, are remade when a parameter
    is replaced or changed in place), in the model's dtype; on CUDA an fp32 model runs under bf16 autocast.
    `from_bundle` loads fp32 weights on CPU and bf16 on CUDA.
    """

    def __init__(self, model: Transformer, tokenizer: tokenizers.Tokenizer, device: torch.device) -> None:
        _refuse_unsupported_layout(model.args)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.args: ModelArgs = model.args
        self.max_context: int = model.args.seq_len
        weight_dtype = model.embed_tokens.weight.dtype
        self.autocast = self.device.type == "cuda" and weight_dtype == torch.float32
        self.cache_dtype = torch.bfloat16 if self.autocast else weight_dtype
        # RoPE in fp32 whatever the weights' dtype, as in training under autocast; one table of cos and
        # sin by position, sin negated on its first half (where rotate-half negates)
        cos, sin = rope_tables(self.args, self.max_context, self.device)
        half = self.args.head_dim // 2
        self.rope = torch.cat([cos, -sin[:, :half], sin[:, half:]], dim=-1)
        self._weights: _Weights | None = None
        self._weights_version: list | None = None
        special = [tokenizer.token_to_id(token) for token in (END_OF_TEXT, END_OF_TURN)]
        self.default_stop_token_ids = {token for token in special if token is not None}

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "auto") -> Engine:
        """An engine for a release bundle folder (model.safetensors, config.json, tokenizer.json)."""
        from atomlab.tokenizer import load_tokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise AtomlabError(f"{folder}: not a folder (give the path of a release bundle)")
        if not (folder / "tokenizer.json").is_file():
            raise AtomlabError(f"{folder}: no tokenizer.json; not a complete release bundle")
        model = load_model(folder)
        tokenizer = load_tokenizer(folder / "tokenizer.json")
        if tokenizer.get_vocab_size() > model.args.vocab_size:
            raise AtomlabError(
                f"{folder}: tokenizer.json has {tokenizer.get_vocab_size()} tokens, "
                f"the model only {model.args.vocab_size}"
            )
        chosen = resolve_device(device)
        model.to(chosen, dtype=torch.bfloat16 if chosen.type == "cuda" else torch.float32)
        return cls(model, tokenizer, chosen)

    # text <-> tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in it (such as <|end|>) become their single ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens left out."""
        return self.tokenizer.decode(ids)

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The chat template of atomlab.tokenizer, rendered and encoded as Hugging Face's apply_chat_template
        would: "<|role|>\ncontent<|end|>\n" per message, then "<|assistant|>\n"."""
        return self.encode("".join(text for text, _ in render_chat(messages, add_generation_prompt)))

    # generation

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions of the requests, in order, decoded together as one batch."""
        sequences = [self._start(request) for request in requests]
        for _ in self._decode(sequences):
            pass
        return [sequence.completion() for sequence in sequences]

    def stream(self, request: Request) -> Generator[str, None, Completion]:
        """Text pieces of one request as they are generated (on_text, if set, is called too).
        The generator's return value (StopIteration.value) is the Completion."""
        pieces: list[str] = []

        def collect(piece: str) -> None:
            pieces.append(piece)
            if request.on_text is not None:
                request.on_text(piece)

        sequence = self._start(replace(request, on_text=collect))
        for _ in self._decode([sequence]):
            yield from pieces
            pieces.clear()
        yield from pieces
        return sequence.completion()

    def _start(self, request: Request) -> _Sequence:
        params = request.params
        check_params(params, self.args.vocab_size)
        prompt = request.prompt
        if not prompt:
            raise AtomlabError("empty prompt: give at least one token (for instance the <|endoftext|> id)")
        if any(not isinstance(token, int) or not 0 <= token < self.args.vocab_size for token in prompt):
            raise AtomlabError(f"prompt: token ids must be integers in 0..{self.args.vocab_size - 1} (the vocabulary)")
        if len(prompt) >= self.max_context:
            raise AtomlabError(
                f"prompt is {len(prompt)} tokens; the model's context is {self.max_context} tokens "
                f"(prompt + completion), so a prompt may have at most {self.max_context - 1}"
            )
        budget = min(params.max_tokens, self.max_context - len(prompt))
        stop_token_ids = self.default_stop_token_ids | set(params.stop_token_ids)
        return _Sequence(request, budget, stop_token_ids, self.tokenizer)

    def _decode(self, sequences: list[_Sequence]) -> Iterator[None]:
        """Prefill, then one token for every live sequence per step; yields after each step."""
        live = [sequence for sequence in sequences if not sequence.finished]
        if not live:
            return
        weights = self._current_weights()
        cache, logits = self._prefill([sequence.request.prompt for sequence in live], live, weights)
        sampler = _Sampler(live, self.args.vocab_size, self.device)
        while True:
            tokens = sampler.sample(logits, len(live[0].token_ids))
            for sequence, token in zip(live, tokens.tolist(), strict=True):
                sequence.add_token(token)
            yield
            still_live = [i for i, sequence in enumerate(live) if not sequence.finished]
            if not still_live:
                return
            if len(still_live) < len(live):
                rows = torch.tensor(still_live, device=self.device)
                cache.keep_rows(rows)
                tokens = tokens.index_select(0, rows)
                live = [live[i] for i in still_live]
                sampler = _Sampler(live, self.args.vocab_size, self.device)
            logits = self._forward(tokens.unsqueeze(1), cache, weights)

    @torch.inference_mode()
    def _current_weights(self) -> _Weights:
        """The decode weights of the model as it is now, remade when a parameter has changed since."""
        version = _weights_version(self.model)
        if self._weights is None or version is None or version != self._weights_version:
            self._weights, self._weights_version = _decode_weights(self.model), version
        return self._weights

    @torch.inference_mode()
    def _prefill(
        self, prompts: list[list[int]], sequences: list[_Sequence], weights: _Weights
    ) -> tuple[_KVCache, torch.Tensor]:
        longest = max(len(prompt) for prompt in prompts)
        # the last sampled token is never fed back, so the cache needs one slot less than the budget
        capacity = longest + max(sequence.budget for sequence in sequences) - 1
        shape = (len(prompts), self.args.n_kv_heads, capacity, self.args.head_dim)
        padding = torch.tensor([longest - len(prompt) for prompt in prompts], device=self.device)
        cache = _KVCache(
            keys=[torch.empty(shape, dtype=self.cache_dtype, device=self.device) for _ in range(self.args.n_layers)],
            values=[torch.empty(shape, dtype=self.cache_dtype, device=self.device) for _ in range(self.args.n_layers)],
            padding=padding,
            visible=(torch.arange(capacity, device=self.device) >= padding.unsqueeze(1)).view(len(prompts), 1, 1, -1),
            length=0,
        )
        pad_id = 0  # any id: padded slots are masked out of every real row's attention
        rows = [[pad_id] * (longest - len(prompt)) + prompt for prompt in prompts]
        return cache, self._forward(torch.tensor(rows, device=self.device), cache, weights)

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor, cache: _KVCache, weights: _Weights) -> torch.Tensor:
        """Logits (batch, vocab) in fp32 for the token after `tokens` (batch, length), which fill the
        next slots of the cache: atomlab.model.Transformer.forward, reading and writing the KV cache.
        Outside attention, the rows are the tokens that are not padding, one after the other."""
        batch, length = tokens.shape
        start, end = cache.length, cache.length + length
        real = last = None  # which of the batch x length slots are tokens, and each row's last token
        if length == 1:  # a decode step: the query is the newest slot, it sees every slot not padding
            positions = start - cache.padding
            mask = cache.visible[..., :end]
        else:
            slots = torch.arange(start, end, device=self.device)
            positions = (slots.unsqueeze(0) - cache.padding.unsqueeze(1)).flatten()  # (batch x length)
            # a query sees the keys at or before its slot that are not padding; a padding query sees
            # itself only, so that its softmax is defined (its output is never used)
            key_slots = torch.arange(end, device=self.device)
            causal = key_slots.view(1, 1, -1) <= slots.view(1, -1, 1)
            itself = key_slots.view(1, 1, -1) == slots.view(1, -1, 1)
            mask = ((causal & cache.visible[:, 0, :, :end]) | itself).unsqueeze(1)  # (batch, 1, length, keys)
            last = torch.arange(length - 1, batch * length, length, device=self.device)
            visible = cache.visible[:, 0, 0, start:end]
            if not bool(visible.all()):
                real = visible.flatten().nonzero().squeeze(1)
                positions, tokens = positions[real], tokens.flatten()[real]
                last = visible.sum(dim=1).cumsum(dim=0) - 1
        rope = self.rope[positions].unsqueeze(1)  # (tokens, 1, 2 x head_dim): cos, then signed sin
        cos, sin = rope.chunk(2, dim=-1)

        args = self.args
        heads, kv_heads, head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        model = self.model
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext():
            x = model.embed_tokens(tokens.flatten())
            layers = weights.layers
            for index, layer in enumerate(layers):
                h = F.rms_norm(x, (args.d_model,), layer.attention_norm, args.norm_eps)
                qkv = layer.qkv(h).view(-1, heads + 2 * kv_heads, head_dim)
                qk, v = qkv.split([heads + kv_heads, kv_heads], dim=1)
                if layer.qk_norm is not None:
                    qk = F.rms_norm(qk, (head_dim,), None, args.norm_eps) * layer.qk_norm
                half = head_dim // 2
                qk = qk * cos + torch.cat([qk[..., half:], qk[..., :half]], dim=-1) * sin  # apply_rope
                if real is not None:  # back to batch x length slots; padding's keys and values are 0
                    qk = qk.new_zeros(batch * length, heads + kv_heads, head_dim).index_copy_(0, real, qk)
                    v = v.new_zeros(batch * length, kv_heads, head_dim).index_copy_(0, real, v)
                qk = qk.view(batch, length, -1, head_dim).transpose(1, 2)
                keys, values = cache.keys[index], cache.values[index]
                keys.narrow(2, start, length).copy_(qk[:, heads:])
                values.narrow(2, start, length).copy_(v.view(batch, length, -1, head_dim).transpose(1, 2))
                q, query_mask = qk[:, :heads], mask
                final = index == len(layers) - 1 and last is not None
                if final:  # only each row's last position is needed from here on
                    q, query_mask = q[:, :, -1:], mask[:, :, -1:]
                out = F.scaled_dot_product_attention(
                    q.to(self.cache_dtype),
                    keys.narrow(2, 0, end),
                    values.narrow(2, 0, end),
                    attn_mask=query_mask,
                    enable_gqa=kv_heads != heads,
                )
                out = out.transpose(1, 2).reshape(-1, heads * head_dim)
                if final:
                    x = x.index_select(0, last)
                elif real is not None:
                    out = out.index_select(0, real)
                x = x + layer.o(out)
                h = F.rms_norm(x, (args.d_model,), layer.mlp_norm, args.norm_eps)
                gate_up = layer.gate_up(h)
                if args.mlp == "swiglu":
                    gate, up = gate_up.chunk(2, dim=-1)
                    x = x + layer.down(F.silu(gate) * up)
                else:
                    x = x + layer.down(F.relu(gate_up).square())
            if last is not None and not layers:
                x = x.index_select(0, last)
            logits = weights.lm_head(model.norm(x))
        cache.length = end
        return logits.float()


def load_model(folder: Path) -> Transformer:
    """A trained model, in eval mode, from a folder holding config.json and model.safetensors (a release
    bundle or a pretrain step's folder); AtomlabError naming the file when either is missing or wrong."""
    from atomlab.train.checkpoint import load_weights

    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise AtomlabError(f"{folder}: no {name}; not a complete release bundle")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        args = ModelArgs.from_config(config)
        model = Transformer(args)
    except (ValueError, TypeError, KeyError, RuntimeError, ZeroDivisionError) as exc:
        raise AtomlabError(f"{folder / 'config.json'}: not a valid model config ({exc})") from None
    try:
        load_weights(model, folder / "model.safetensors", args.tie_embeddings)
    except RuntimeError as exc:  # load_state_dict: shapes that do not match the config
        detail = str(exc).strip().splitlines()[-1].strip()
        raise AtomlabError(f"{folder}/model.safetensors: weights do not match config.json ({detail})") from None
    return model.eval()


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Raise AtomlabError naming the first sampling setting out of range."""
    problems = []
    if not isinstance(params.max_tokens, int) or params.max_tokens < 0:
        problems.append(f"max_tokens must be an integer >= 0, got {params.max_tokens!r}")
    if not params.temperature >= 0:
        problems.append(f"temperature must be >= 0, got {params.temperature!r}")
    if not isinstance(params.top_k, int) or params.top_k < 0:
        problems.append(f"top_k must be an integer >= 0 (0 = off), got {params.top_k!r}")
    if not 0 < params.top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {params.top_p!r}")
    if any(not isinstance(stop, str) or not stop for stop in params.stop):
        problems.append(f"stop strings must be non-empty text, got {params.stop!r}")
    if any(not isinstance(token, int) or not 0 <= token < vocab_size for token in params.stop_token_ids):
        problems.append(f"stop_token_ids must be token ids in 0..{vocab_size - 1}, got {params.stop_token_ids!r}")
    if problems:
        raise AtomlabError(f"sampling: {problems[0]}")


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AtomlabError(f"device {name}: no CUDA device is available (use cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AtomlabError(f"device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
