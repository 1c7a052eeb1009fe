"""The generation engine: one batched sampler with a KV cache, used by chat, the server, evaluation and RL.

A batch holds prompts of different lengths, left-padded to the longest. Every row keeps its own
RoPE positions (slot minus its padding) and an attention mask that hides the padding, so a row
gives the same tokens in any batch as alone. Keys and values live in a cache preallocated per
layer for the whole batch; after the prompt (prefill) each step feeds one token per row. A row
that finishes is removed from the batch (its cache rows dropped), so it costs nothing more.

The cached forward is written here from the model's own modules (`q_proj`, `apply_rope`, `mlp`...)
so that atomlab/model.py keeps a single training path. Sampling is temperature, then top-k, then
top-p, with one `torch.Generator` per request: a request's draws depend only on its seed and its
own logits. Text is decoded incrementally, never split inside a UTF-8 character, and text that
could be the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F

from atomlab.errors import AtomlabError
from atomlab.model import Attention, ModelArgs, Transformer, rope_tables
from atomlab.tokenizer import END_OF_TEXT, END_OF_TURN

CHAT_ROLES = ("system", "user", "assistant")


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
    length: int  # slots written so far (the same for every row)

    @torch.inference_mode()
    def keep_rows(self, rows: torch.Tensor) -> None:
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.padding = self.padding.index_select(0, rows)


class Engine:
    """Batched generation from a Transformer and its tokenizer. Not thread-safe: one generate at a time.

    The engine runs the model it is given, without copying it (so a trainer's updated weights are
    used by the next call), in the model's dtype; on CUDA an fp32 model runs under bf16 autocast.
    `from_bundle` loads fp32 weights on CPU and bf16 on CUDA.
    """

    def __init__(self, model: Transformer, tokenizer: tokenizers.Tokenizer, device: torch.device) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.args: ModelArgs = model.args
        self.max_context: int = model.args.seq_len
        weight_dtype = model.embed_tokens.weight.dtype
        self.autocast = self.device.type == "cuda" and weight_dtype == torch.float32
        self.cache_dtype = torch.bfloat16 if self.autocast else weight_dtype
        # RoPE in fp32 whatever the weights' dtype, as in training under autocast
        self.rope_cos, self.rope_sin = rope_tables(self.args, self.max_context, self.device)
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
        would: "<|role|>\\ncontent<|end|>\\n" per message, then "<|assistant|>\\n"."""
        parts = []
        for number, message in enumerate(messages, 1):
            role, content = message.get("role"), message.get("content")
            if role not in CHAT_ROLES:
                raise AtomlabError(f"chat message {number}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
            if not isinstance(content, str):
                raise AtomlabError(f"chat message {number}: content must be text, got {type(content).__name__}")
            parts.append(f"<|{role}|>\n{content}{END_OF_TURN}\n")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return self.encode("".join(parts))

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
        cache, logits = self._prefill([sequence.request.prompt for sequence in live], max(s.budget for s in live))
        while True:
            tokens = self._sample(logits, live)
            for sequence, token in zip(live, tokens, strict=True):
                sequence.add_token(token)
            yield
            still_live = [i for i, sequence in enumerate(live) if not sequence.finished]
            if not still_live:
                return
            if len(still_live) < len(live):
                cache.keep_rows(torch.tensor(still_live, device=self.device))
                live = [live[i] for i in still_live]
                tokens = [tokens[i] for i in still_live]
            logits = self._step(cache, tokens)

    @torch.inference_mode()
    def _prefill(self, prompts: list[list[int]], max_budget: int) -> tuple[_KVCache, torch.Tensor]:
        longest = max(len(prompt) for prompt in prompts)
        # the last sampled token is never fed back, so the cache needs one slot less than the budget
        capacity = longest + max_budget - 1
        shape = (len(prompts), self.args.n_kv_heads, capacity, self.args.head_dim)
        cache = _KVCache(
            keys=[torch.empty(shape, dtype=self.cache_dtype, device=self.device) for _ in range(self.args.n_layers)],
            values=[torch.empty(shape, dtype=self.cache_dtype, device=self.device) for _ in range(self.args.n_layers)],
            padding=torch.tensor([longest - len(prompt) for prompt in prompts], device=self.device),
            length=0,
        )
        pad_id = 0  # any id: padded slots are masked out of every real row's attention
        rows = [[pad_id] * (longest - len(prompt)) + prompt for prompt in prompts]
        tokens = torch.tensor(rows, device=self.device)
        return cache, self._forward(tokens, cache)

    @torch.inference_mode()
    def _step(self, cache: _KVCache, tokens: list[int]) -> torch.Tensor:
        return self._forward(torch.tensor(tokens, device=self.device).unsqueeze(1), cache)

    def _forward(self, tokens: torch.Tensor, cache: _KVCache) -> torch.Tensor:
        """Logits (batch, vocab) in fp32 for the token after `tokens` (batch, length), which fill the
        next slots of the cache."""
        start, length = cache.length, tokens.shape[1]
        slots = torch.arange(start, start + length, device=self.device)
        positions = (slots.unsqueeze(0) - cache.padding.unsqueeze(1)).clamp(min=0)  # (batch, length)
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        # a query sees the keys at or before its slot that are not padding; a padding query sees
        # itself only, so that its softmax is defined (its output is never used)
        key_slots = torch.arange(start + length, device=self.device)
        causal = key_slots.view(1, 1, -1) <= slots.view(1, -1, 1)
        not_padding = key_slots.view(1, 1, -1) >= cache.padding.view(-1, 1, 1)
        itself = key_slots.view(1, 1, -1) == slots.view(1, -1, 1)
        mask = ((causal & not_padding) | itself).unsqueeze(1)  # (batch, 1, length, keys)

        model = self.model
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext():
            x = model.embed_tokens(tokens)
            for index, layer in enumerate(model.layers):
                attention = self._attention(
                    layer.self_attn, layer.input_layernorm(x), cos, sin, cache, index, start, mask
                )
                x = x + attention
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            logits = model.lm_head(model.norm(x[:, -1]))
        cache.length = start + length
        return logits.float()

    def _attention(
        self,
        attention: Attention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: _KVCache,
        layer: int,
        start: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """atomlab.model.Attention.forward, reading and writing the KV cache."""
        batch, length, _ = x.shape
        q, k, v = attention.project(x, cos, sin)
        q, k = q.to(self.cache_dtype), k.to(self.cache_dtype)
        end = start + length
        cache.keys[layer][:, :, start:end] = k
        cache.values[layer][:, :, start:end] = v
        out = F.scaled_dot_product_attention(
            q,
            cache.keys[layer][:, :, :end],
            cache.values[layer][:, :, :end],
            attn_mask=mask,
            enable_gqa=attention.n_kv_heads != attention.n_heads,
        )
        return attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    @torch.inference_mode()
    def _sample(self, logits: torch.Tensor, sequences: list[_Sequence]) -> list[int]:
        """The next token of each row: argmax where temperature is 0, otherwise a draw from the
        row's own generator after temperature, top-k and top-p."""
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, sequence in enumerate(sequences) if sequence.params.temperature > 0]
        if sampled:
            params = [sequences[i].params for i in sampled]
            rows = torch.tensor(sampled, device=self.device)
            vocab = logits.shape[-1]
            temperature = torch.tensor([p.temperature for p in params], device=self.device).unsqueeze(1)
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=self.device)
            top_p = torch.tensor([p.top_p for p in params], device=self.device).unsqueeze(1)
            # one uniform per row per step, from the row's generator: its draws do not depend on the batch
            uniform = torch.stack([torch.rand((), generator=sequences[i].generator) for i in sampled])

            sorted_logits, order = (logits[rows] / temperature).sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=self.device)
            sorted_logits = sorted_logits.masked_fill(rank >= top_k.unsqueeze(1), float("-inf"))
            probs = sorted_logits.softmax(dim=-1)
            # top-p: keep the most likely tokens until their mass reaches top_p (the first always stays)
            mass_before = probs.cumsum(dim=-1) - probs
            probs = probs.masked_fill((mass_before >= top_p) & (top_p < 1), 0.0)
            cumulative = probs.cumsum(dim=-1)
            threshold = uniform.to(self.device).unsqueeze(1) * cumulative[:, -1:]
            choice = torch.searchsorted(cumulative, threshold, right=True).clamp(max=vocab - 1)
            tokens[rows] = order.gather(1, choice).squeeze(1)
        return tokens.tolist()


def load_model(folder: Path) -> Transformer:
    """A trained model, in eval mode, from a folder holding config.json and model.safetensors (a release
    bundle or a pretrain step's folder); AtomlabError naming the file when either is missing or wrong."""
    from atomlab.train.checkpoint import load_weights

    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise AtomlabError(f"{folder}: no {name}; not a complete release bundle")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        args = ModelArgs(**{f.name: config[f.name] for f in fields(ModelArgs) if f.name in config})
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
