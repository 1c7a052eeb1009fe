"""The generation engine: batched sampling with a KV cache, used by chat, the server, evaluation and RL.

The engine runs the model's own forward (`Transformer.forward(tokens, cache)`, its blocks called whole)
with an `atomlab.model.KVCache`, in which every row keeps its own length and positions: a row gives the
same tokens in any batch as alone. A `Batch` is the set of sequences being decoded: sequences join it
between steps (their prompts are prefilled together, left-padded to the longest, into free rows of the
cache) and leave it when they finish or are cancelled (the last row moves into the freed one), so the
server batches continuously and `Engine.generate` is one batch that only shrinks. On CPU in fp32 the
model's nn.Linear layers run, while the engine calls the model, on copies of their weights packed for
oneDNN (a fast path derived from the modules, not a second forward).

Sampling is temperature, then top-k, then top-p, as an inverse-CDF draw over the tokens sorted from the
most likely, with one `torch.Generator` per request that draws one uniform per token: a request's tokens
depend only on its seed and its own logits. Only the top-k (or, with top-k off, the 64 most likely tokens)
are sorted, unless the draw lands beyond them. Log-probabilities, when asked for, are those of the model's
distribution (the logits before temperature, top-k and top-p), as vLLM reports them. Text is decoded
incrementally, never split inside a UTF-8 character, and text that could be the start of a stop string is
held back until it cannot. One sequence that fails (its callback raises, its prompt cannot be prefilled)
ends alone with finish_reason "error"; the others go on.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from atomlab.chat_format import ChatFormat
from atomlab.device import resolve_device
from atomlab.errors import AtomlabError
from atomlab.model import MLP, Attention, KVCache, ModelArgs, Transformer
from atomlab.tokenizer import encode_plain

MAX_LOGPROBS = 20  # the most likely tokens reported beside each sampled one, at most (OpenAI's limit)


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings: generation ends before them, text excludes them
    stop_token_ids: list[int] = field(default_factory=list)  # plus the chat format's (eos ids and end of turn)
    seed: int | None = None  # per-request seed: same seed + same prompt -> same output, whatever else is in the batch
    logprobs: int | None = None  # None: none; k: each sampled token's log-probability and the k most likely


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    # streaming: called with each new piece of text (never split inside a UTF-8 character, never part of a stop string)
    on_text: Callable[[str], None] | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # natural log of the model's probability of the token (before temperature, top-k, top-p)
    top: list[tuple[int, float]]  # the most likely tokens and their log-probabilities, most likely first


@dataclass
class Completion:
    text: str  # the decoded completion, ending before a stop string or stop token
    token_ids: list[int]  # every sampled token, including the stop token or the tokens of a stop string
    finish_reason: str  # "stop" (stop token or string), "length" (max_tokens or the end of the context),
    # "cancelled" (Generation.cancel) or "error" (Generation.error says why)
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them


class Generation:
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
        self.logprobs: list[TokenLogprob] | None = None if self.params.logprobs is None else []
        self.error: Exception | None = None  # why it ended, when finish_reason is "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """End it now (the client went away): the batch drops it at its next step."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def fail(self, error: Exception) -> None:
        self.error, self.finish_reason = error, "error"

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
            logprobs=None if self.logprobs is None else list(self.logprobs),
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
    steps: torch.Tensor  # (rows, 1): the step each row was at when the sampler was made


class _Sampler:
    """The next token of each live row: argmax where temperature is 0, otherwise a draw after
    temperature, top-k and top-p, using the row's own uniform for this step (so its draws do not
    depend on the batch). Made once for a set of live rows, which may be at different steps."""

    def __init__(self, sequences: list[Generation], vocab: int, device: torch.device) -> None:
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
                    steps=torch.tensor([[len(sequences[i].token_ids)] for i in rows], device=device),
                )
            )

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, advanced: int) -> torch.Tensor:
        """Token ids (rows,) from logits (rows, vocab), `advanced` steps after the sampler was made."""
        if not self.groups:
            return logits.argmax(dim=-1)
        tokens = logits.argmax(dim=-1) if self.greedy else None
        for group in self.groups:
            scaled = (logits if group.rows is None else logits.index_select(0, group.rows)) / group.temperature
            drawn = _draw(scaled, group.top_k, group.top_p, group.uniforms.gather(1, group.steps + advanced))
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


# oneDNN's packed matmul (where there is one) beats F.linear from this many rows and multiply-adds;
# below, its fixed cost (about 13 us a call) is more than it saves
_ONEDNN_ROWS = 4
_ONEDNN_MACS = 2**21


class _FastPath:
    """Fast paths derived from the model's modules, whatever the architecture, which its own forward takes
    while the engine runs it (the training forward is left as it is):
    - the projections that read the same input side by side in one matrix multiply, on a copy of their
      weights concatenated: each attention's q, k and v (`Attention.fused_qkv`, then QK-norm and RoPE on q
      and k together), each SwiGLU MLP's gate and up (`MLP.fused_gate_up`); 4 matrix multiplies a block
      instead of 7, the same products;
    - on CPU, every matrix multiply on a copy of its weight laid out for torch.mm and, in fp32, packed for
      oneDNN, for products large enough (1.3x MKL at 16 rows of the tiny model).
    The copies are remade when a parameter is replaced or changed in place (RL trains the model between
    generate calls). Off where parameters are not plain tensors (FSDP's or TP's DTensors, LoRA's
    parametrized weights): the modules then run as in training."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.fused: list[tuple[torch.nn.Module, str, Callable]] = []  # (module, attribute, its fast path)
        self.forwards: dict[torch.nn.Linear, Callable] = {}  # the other linear layers' packed forwards
        self.version: list | None = None
        weights = [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)]
        self.usable = bool(weights) and all(type(w) is torch.nn.Parameter for w in weights)
        on_cpu_fp32 = all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)
        self.pack = self.usable and on_cpu_fp32 and _onednn_works()

    def refresh(self) -> None:
        if not self.usable:
            return
        version = _weights_version(self.model)
        if version is None or version != self.version:
            with torch.no_grad():
                self._prepare()
            self.version = version

    def _prepare(self) -> None:
        fused, covered = [], set()
        for module in self.model.modules():
            if isinstance(module, Attention):
                linears = (module.q_proj, module.k_proj, module.v_proj)
                fused.append((module, "fused_qkv", _linear_of(linears, self.pack)))
                if module.q_norm is not None and not module.norm_projection:
                    norms = [module.q_norm.weight.expand(module.n_heads, -1)]
                    norms.append(module.k_norm.weight.expand(module.n_kv_heads, -1))
                    fused.append((module, "fused_qk_norm", torch.cat(norms).unsqueeze(1)))
            elif isinstance(module, MLP) and module.gate_proj is not None:
                linears = (module.gate_proj, module.up_proj)
                fused.append((module, "fused_gate_up", _linear_of(linears, self.pack)))
            else:
                continue
            covered.update(linears)
        self.fused = fused
        linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear) and m not in covered]
        on_cpu = all(linear.weight.device.type == "cpu" for linear in linears)
        self.forwards = {linear: _linear_of((linear,), self.pack) for linear in linears} if on_cpu else {}

    @contextmanager
    def applied(self) -> Iterator[None]:
        # written straight into the modules' __dict__: nn.Module's __setattr__ costs more than the write, and
        # a forward instance attribute is what nn.Module.__call__ runs, hooks and all
        for module, name, forward in self.fused:
            module.__dict__[name] = forward
        for linear, forward in self.forwards.items():
            linear.__dict__["forward"] = forward
        try:
            yield
        finally:
            for module, name, _ in self.fused:
                module.__dict__[name] = None
            for linear in self.forwards:
                del linear.__dict__["forward"]


def _linear_of(linears: tuple[torch.nn.Linear, ...], pack: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the linear layers' outputs side by side, on a copy of their weights. On CPU the copy is laid out
    (in, out) for `torch.mm` (10-25% faster than F.linear's (out, in) for the few rows of a decode step),
    and, if asked, also packed for oneDNN, used for products of enough rows and multiply-adds."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    # the layers fused have biases or not together (ModelArgs.qkv_bias; the MLP has none)
    bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
    if weight.device.type != "cpu":
        return lambda x: F.linear(x, weight, bias)
    by_columns = weight.t().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16) if pack else None  # right for any rows
    enough_numel = max(_ONEDNN_ROWS, -(-_ONEDNN_MACS // weight.numel())) * weight.shape[1]  # rows x in

    def forward(x: torch.Tensor) -> torch.Tensor:
        if packed is not None and x.numel() >= enough_numel:
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
            return out.view(*x.shape[:-1], out.shape[-1])
        out = torch.matmul(x, by_columns)  # one torch.mm over the rows of every leading dimension
        return out if bias is None else out.add_(bias)

    return forward


@functools.cache
def _onednn_works() -> bool:
    """Whether this torch build has oneDNN's packed linear and it computes F.linear (checked once)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)  # the global RNG is training's: left untouched
            weight, x = torch.randn(24, 40, generator=generator), torch.randn(3, 40, generator=generator)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            return torch.allclose(out, F.linear(x, weight), rtol=1e-4, atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _weights_version(model: torch.nn.Module) -> list | None:
    """What changes when a parameter is replaced or written in place (its version counter); None when that
    cannot be told (parameters made under inference mode have no version counter)."""
    try:
        return [(p.data_ptr(), p.dtype, p._version) for p in model.parameters()]
    except RuntimeError:
        return None


def _in_engine_mode(method: Callable) -> Callable:
    """Run a Batch method in its engine's grad mode (Engine.mode), so that every tensor the batch keeps
    between calls is made and changed under the one mode."""

    @functools.wraps(method)
    def run(self: Batch, *args, **kwargs):
        with self.engine.mode():
            return method(self, *args, **kwargs)

    return run


class Batch:
    """The sequences being decoded together, as rows of one KV cache. `join` prefills new sequences and
    adds them (between steps, so a running batch takes new requests: continuous batching); `step` feeds
    every live row its last token and samples the next; finished, cancelled and failed rows leave at once.
    Not thread-safe: one thread drives a batch."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.live: list[Generation] = []  # row i of the cache is live[i]
        self.cache: KVCache | None = None
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=engine.device)  # (live,): fed at the next step
        self._sampler: _Sampler | None = None
        self._advanced = 0  # steps since the sampler was made
        engine._fast.refresh()

    @_in_engine_mode
    def join(self, generations: list[Generation]) -> None:
        """Prefill the generations' prompts and sample their first tokens; they then decode with the rest.
        A prefill that fails is retried one generation at a time, so only the one at fault fails."""
        generations = [generation for generation in generations if not generation.finished]
        if not generations:
            return
        try:
            logits = self._prefill(generations)
        except Exception as exc:
            if len(generations) == 1:
                generations[0].fail(exc)
            else:
                for generation in generations:
                    self.join([generation])
            return
        tokens = _Sampler(generations, self.engine.args.vocab_size, self.engine.device).sample(logits, 0)
        _add_tokens(generations, logits, tokens)
        self.live += generations
        self.next_tokens = torch.cat([self.next_tokens, tokens])
        self._sampler = None
        self._drop_finished()

    @_in_engine_mode
    def step(self) -> None:
        """One token for every live row."""
        self._drop_finished()  # cancelled since the last step
        if not self.live:
            return
        logits = self.engine._forward(self.next_tokens.unsqueeze(1), self.cache.rows(0, len(self.live)))
        if self._sampler is None:
            self._sampler, self._advanced = _Sampler(self.live, self.engine.args.vocab_size, self.engine.device), 0
        tokens = self._sampler.sample(logits, self._advanced)
        self._advanced += 1
        _add_tokens(self.live, logits, tokens)
        self.next_tokens = tokens
        self._drop_finished()

    def _prefill(self, generations: list[Generation]) -> torch.Tensor:
        prompts = [generation.request.prompt for generation in generations]
        longest = max(len(prompt) for prompt in prompts)
        first, count = len(self.live), len(generations)
        # the last sampled token is never fed back, so a row needs one slot less than its budget
        self._reserve(first + count, longest + max(generation.budget for generation in generations) - 1)
        rows = self.cache.rows(first, count)
        rows.start.copy_(torch.tensor([longest - len(prompt) for prompt in prompts]))
        rows.lengths.zero_()
        pad_id = 0  # any id: padded slots are masked out of every real row's attention
        tokens = torch.tensor([[pad_id] * (longest - len(prompt)) + prompt for prompt in prompts])
        return self.engine._forward(tokens.to(self.engine.device), rows)

    def _reserve(self, rows: int, slots: int) -> None:
        """A cache with at least this many rows and slots, keeping the live rows (rows grow by doubling)."""
        old = self.cache
        if old is not None and rows <= old.keys[0].shape[0] and slots <= old.slots:
            return
        engine = self.engine
        if old is not None:
            rows, slots = max(rows, 2 * old.keys[0].shape[0]), max(slots, old.slots)
        cache = KVCache(engine.args, rows, slots, engine.cache_dtype, engine.device)
        if old is not None and self.live:
            live, kept = len(self.live), old.slots
            for new_tensors, old_tensors in ((cache.keys, old.keys), (cache.values, old.values)):
                for new, previous in zip(new_tensors, old_tensors, strict=True):
                    new[:live, :, :kept] = previous[:live]
            cache.start[:live], cache.lengths[:live] = old.start[:live], old.lengths[:live]
        self.cache = cache

    def _drop_finished(self) -> None:
        finished = [row for row, generation in enumerate(self.live) if generation.finished]
        if not finished:
            return
        for row in reversed(finished):  # the last row moves into the freed one
            last = len(self.live) - 1
            if row != last:
                self.cache.copy_row(last, row)
                self.next_tokens[row] = self.next_tokens[last]
                self.live[row] = self.live[last]
            self.live.pop()
        self.next_tokens = self.next_tokens[: len(self.live)]
        self._sampler = None


def _add_tokens(generations: list[Generation], logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """Give each generation its sampled token (and its log-probabilities, if it asked); a generation whose
    handling raises (its on_text callback, say) fails alone."""
    reported: dict[int, TokenLogprob] = {}
    wanted = [row for row, generation in enumerate(generations) if generation.logprobs is not None]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        logprobs = logits.index_select(0, rows).log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens.index_select(0, rows).unsqueeze(1)).squeeze(1).tolist()
        most = max(generations[row].params.logprobs for row in wanted)
        top_values, top_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0])
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for i, row in enumerate(wanted):
            k = generations[row].params.logprobs
            top = list(zip(map(int, top_ids[i][:k]), top_values[i][:k], strict=True))
            reported[row] = TokenLogprob(int(tokens[row]), chosen[i], top)
    for row, (generation, token) in enumerate(zip(generations, tokens.tolist(), strict=True)):
        try:
            if row in reported:
                generation.logprobs.append(reported[row])
            generation.add_token(token)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it ends this generation only
            generation.fail(exc)


class Engine:
    """Batched generation from a Transformer and its tokenizer. Not thread-safe: one generate at a time.

    The engine runs the model it is given, through its own forward (a trainer's updated weights are used by
    the next call), in the model's dtype; on CUDA an fp32 model runs under bf16 autocast.
    `from_bundle` loads fp32 weights on CPU and bf16 on CUDA.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: tokenizers.Tokenizer,
        device: torch.device,
        chat_format: ChatFormat | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.args: ModelArgs = model.args
        self.max_context: int = model.args.seq_len
        weight_dtype = model.embed_tokens.weight.dtype
        self.autocast = self.device.type == "cuda" and weight_dtype == torch.float32
        self.cache_dtype = torch.bfloat16 if self.autocast else weight_dtype
        # the model's chat template and stop tokens (atomlab's: <|endoftext|> and <|end|>)
        self.chat_format = chat_format or ChatFormat.for_tokenizer(tokenizer)
        self.default_stop_token_ids = set(self.chat_format.stop_token_ids)
        self._fast = _FastPath(self.model)

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
        return cls(model, tokenizer, chosen, ChatFormat.from_folder(folder, tokenizer))

    # text <-> tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of text as ordinary text: special-token text written in it (such as <|end|>) is spelled
        with ordinary tokens, never a control id (`atomlab.tokenizer.encode_plain`)."""
        return encode_plain(self.tokenizer, [text])[0]

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens left out."""
        return self.tokenizer.decode(ids)

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The conversation in the model's chat template (`self.chat_format`), encoded as Hugging Face's
        apply_chat_template would, special-token text in contents as plain text."""
        return self.chat_format.encode(messages, add_generation_prompt)[0]

    # generation

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions of the requests, in order, decoded together as one batch. If one of them fails (its
        on_text callback raises, say), the others are still decoded, then its error is raised."""
        generations = [self.start(request) for request in requests]
        batch = Batch(self)
        batch.join(generations)
        while batch.live:
            batch.step()
        for generation in generations:
            if generation.error is not None:
                raise generation.error
        return [generation.completion() for generation in generations]

    def stream(self, request: Request) -> Generator[str, None, Completion]:
        """Text pieces of one request as they are generated (on_text, if set, is called too).
        The generator's return value (StopIteration.value) is the Completion."""
        pieces: list[str] = []

        def collect(piece: str) -> None:
            pieces.append(piece)
            if request.on_text is not None:
                request.on_text(piece)

        generation = self.start(replace(request, on_text=collect))
        batch = Batch(self)
        batch.join([generation])
        while True:
            yield from pieces
            pieces.clear()
            if not batch.live:
                break
            batch.step()
        if generation.error is not None:
            raise generation.error
        return generation.completion()

    def start(self, request: Request) -> Generation:
        """A generation for a request, checked (AtomlabError naming what is wrong), ready to join a Batch."""
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
        return Generation(request, budget, stop_token_ids, self.tokenizer)

    def mode(self) -> torch.autograd.grad_mode.no_grad | torch.autograd.grad_mode.inference_mode:
        """Inference mode (no version counters, less work per operation) where the parameters are plain
        tensors; otherwise no_grad, since FSDP's hooks gather and free parameters around each block."""
        return torch.inference_mode() if self._fast.usable else torch.no_grad()

    def _forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (rows, vocab) in fp32 of the token after `tokens` (rows, length), which continue the
        cache's rows: the model's own forward (called by Batch, in `mode()`)."""
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext(), self._fast.applied():
            logits = self.model(tokens, cache)
        return logits[:, -1].float()


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
    if params.logprobs is not None and (
        not isinstance(params.logprobs, int) or not 0 <= params.logprobs <= MAX_LOGPROBS
    ):
        problems.append(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, got {params.logprobs!r}")
    if problems:
        raise AtomlabError(f"sampling: {problems[0]}")
