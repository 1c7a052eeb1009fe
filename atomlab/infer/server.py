"""`atomlab serve BUNDLE`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a web chat page.

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (both with `stream: true` as
server-sent events), `GET /v1/models`, `GET /health`, and the chat page at `/`. Requests are
validated and rejected with OpenAI-style error bodies (`{"error": {"message", "type", "param",
"code"}}`); a field the server cannot honour (`tools`, `response_format`, `logit_bias`, ...) is a
400 naming it, never ignored. `n`, `logprobs`/`top_logprobs`, `seed` and `stream_options.include_usage`
are honoured as OpenAI defines them; choice i of a seeded request samples with seed + i.

One thread owns the engine and decodes every request in one `Batch`. Batching is continuous (the
default): requests that arrive join the running batch within a few steps (at once when they are a
quarter of the batch; their prefill is one forward for all of them), and a sequence leaves it when it
finishes, or at once when its client disconnects. `--batching static` keeps the older way
for comparison: a batch takes the requests waiting when it starts and runs until all of them end.
A request that fails fails alone; the others go on.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from atomlab.errors import AtomlabError
from atomlab.infer.engine import Batch, Completion, Engine, Generation, Request, SamplingParams, TokenLogprob

MAX_TOKENS_LIMIT = 4096
MAX_CHOICES = 16  # n, at most
ADMIT_WITHIN = 4  # continuous batching: steps a waiting request may wait to join, at most (Scheduler._admission_due)
# Fields the server honours, and fields it accepts only at the value that asks for nothing (any other value
# is a 400 naming the field); any field not listed is a 400 too, as OpenAI answers unrecognised arguments.
COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "n",
    "seed",
    "stream",
    "stream_options",
}
COMMON_FIELDS |= {"user", "metadata", "store", "service_tier"}  # bookkeeping: nothing to honour
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
TEXT_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "best_of"}
NEUTRAL = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "parallel_tool_calls": (),
    "response_format": ({"type": "text"},),
    "echo": (False,),
    "suffix": ("",),
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One HTTP request: its n generations and the events they send to its connection, in order:
    ("text", choice, piece, logprobs), then ("done", choice, Completion) or ("error", choice, exception)."""

    generations: list[Generation]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    outbox: list  # the scheduler's: events go out together after each engine step (Scheduler._deliver)
    cancelled: bool = False  # set by the connection's side when the client goes away
    submitted: float = field(default_factory=time.perf_counter)

    def send(self, *event: Any) -> None:
        self.outbox.append((self, event))


def _put_all(events: list[tuple[Job, tuple]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


def reportable_logprobs(generation: Generation) -> list[TokenLogprob]:
    """The log-probabilities of the tokens whose text the completion holds: all but a final stop token."""
    logprobs = generation.logprobs or []
    ended_on_stop_token = bool(generation.token_ids) and generation.token_ids[-1] in generation.stop_token_ids
    return (
        logprobs[: len(logprobs) - 1]
        if ended_on_stop_token and len(logprobs) == len(generation.token_ids)
        else logprobs
    )


class Scheduler:
    """The engine's thread: admits requests into the running batch (at every step when continuous, only
    when the batch is empty when static) and sends each generation's text and end back to its job."""

    def __init__(self, engine: Engine, max_batch: int, continuous: bool = True) -> None:
        self.engine, self.max_batch, self.continuous = engine, max_batch, continuous
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.running: list[tuple[Job, int, Generation]] = []
        self.outbox: list[tuple[Job, tuple]] = []  # events of the jobs, sent by the engine's thread only
        self.waiting_since: int | None = None  # the step at which requests were first seen waiting
        self.requests = self.steps = self.rows_stepped = self.largest_batch = self.cancelled = self.failed = 0
        self.thread = threading.Thread(target=self._work, name="atomlab-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request, n: int) -> Job:
        """Queue n generations of a request (choice i sampling with seed + i); AtomlabError if it is invalid."""
        loop = asyncio.get_running_loop()
        job = Job([], loop, asyncio.Queue(), self.outbox)
        for choice in range(n):
            seed = request.params.seed
            params = request.params if seed is None or choice == 0 else _with_seed(request.params, seed + choice)
            sent = [0]  # log-probabilities already sent with a piece of text

            def on_text(piece: str, choice: int = choice, sent: list[int] = sent) -> None:
                generation = job.generations[choice]
                logprobs = reportable_logprobs(generation)
                job.send("text", choice, piece, logprobs[sent[0] :] if generation.logprobs is not None else None)
                sent[0] = len(logprobs)

            job.generations.append(self.engine.start(Request(request.prompt, params, on_text)))
        self.waiting.put(job)
        return job

    def stats(self) -> dict[str, Any]:
        return {
            "batching": "continuous" if self.continuous else "static",
            "requests": self.requests,
            "steps": self.steps,
            "mean_batch": round(self.rows_stepped / max(1, self.steps), 2),
            "largest_batch": self.largest_batch,
            "live": len(self.running),
            "cancelled": self.cancelled,
            "failed": self.failed,
        }

    def _work(self) -> None:
        batch = Batch(self.engine)
        while True:
            if not batch.live:
                self._admit(batch, block=True)
            elif self.continuous and self._admission_due(len(batch.live)):
                self._admit(batch, block=False)
            for job, _, generation in self.running:
                if job.cancelled:
                    generation.cancel()
            if batch.live:
                self.steps += 1
                self.rows_stepped += len(batch.live)
                self.largest_batch = max(self.largest_batch, len(batch.live))
                try:
                    batch.step()
                except Exception as exc:  # noqa: BLE001 - the forward itself failed: no row can go on
                    for _, _, generation in self.running:
                        generation.fail(exc)
                    batch = Batch(self.engine)
            self._report()

    def _admission_due(self, live: int) -> bool:
        """Whether the requests waiting join the running batch before this step. A join is one more forward
        (their prefill) beside the step's, about as costly as the step itself for a small model, so joining
        at every step as requests trickle in would halve the batch's speed: they join when they are a
        quarter of the batch or more, or when the first of them has waited ADMIT_WITHIN steps (its first
        token is then late by that many steps at most, where a static batch makes it wait for the batch's
        end)."""
        waiting = self.waiting.qsize()
        if not waiting:
            self.waiting_since = None
            return False
        if self.waiting_since is None:
            self.waiting_since = self.steps
        return 4 * waiting >= live or self.steps - self.waiting_since >= ADMIT_WITHIN

    def _admit(self, batch: Batch, block: bool) -> None:
        self.waiting_since = None
        joining: list[Generation] = []
        while True:
            try:
                job = self.waiting.get() if block and not joining else self.waiting.get_nowait()
            except queue.Empty:
                break
            if job.cancelled:
                continue
            self.requests += 1
            joining += job.generations
            self.running += [(job, choice, generation) for choice, generation in enumerate(job.generations)]
            if len(batch.live) + len(joining) >= self.max_batch:
                break
        if joining:
            batch.join(joining)
            self._report()

    def _deliver(self) -> None:
        """Hand the events of a step to the event loops in one call per loop: one wake-up a step rather than
        one a token, so the engine's thread and the connections contend less for the interpreter."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, tuple]]] = {}
        for job, event in self.outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self.outbox.clear()
        for loop, events in by_loop.items():
            loop.call_soon_threadsafe(_put_all, events)

    def _report(self) -> None:
        still = []
        for job, choice, generation in self.running:
            if not generation.finished:
                still.append((job, choice, generation))
            elif generation.finish_reason == "cancelled":
                self.cancelled += 1
            elif generation.error is not None:
                self.failed += 1
                job.send("error", choice, generation.error)
            else:
                job.send("done", choice, generation.completion(), reportable_logprobs(generation))
        self.running = still
        self._deliver()


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed)


def _number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def check_fields(body: dict, kind: Literal["chat", "text"]) -> None:
    """A 400 naming the first field this server would not honour."""
    honoured = CHAT_FIELDS if kind == "chat" else TEXT_FIELDS
    for name, value in body.items():
        if name in honoured or value is None:
            continue
        if name in NEUTRAL:
            if value in NEUTRAL[name]:
                continue
            raise APIError(400, f"'{name}' is not supported by this server (it would be ignored); leave it out", name)
        raise APIError(400, f"unrecognized request argument '{name}'", name)
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict) or set(options) - {"include_usage"} or not body.get("stream")
    ):
        raise APIError(400, "'stream_options' must be {'include_usage': bool}, with stream: true", "stream_options")


def choices(body: dict) -> int:
    n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise APIError(400, "'best_of' is not supported by this server unless it equals n", "best_of")
    return n


def logprobs_wanted(body: dict, kind: Literal["chat", "text"]) -> int | None:
    """How many of the most likely tokens to report beside each sampled one (None: no log-probabilities)."""
    if kind == "text":  # the legacy API: logprobs is that number, at most 5
        value = body.get("logprobs")
        return None if value is None else _number(body, "logprobs", 0, 0, 5, integer=True)
    wanted = body.get("logprobs") or False
    if not isinstance(wanted, bool):
        raise APIError(400, f"'logprobs' must be true or false, got {wanted!r}", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not wanted:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return _number(body, "top_logprobs", 0, 0, 20, integer=True) if wanted else None


def sampling_params(body: dict, engine: Engine, prompt_tokens: int) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    room = engine.max_context - prompt_tokens
    if room <= 0:
        raise APIError(
            400,
            f"the prompt is {prompt_tokens} tokens; this model's context is {engine.max_context} tokens",
            "messages",
            "context_length_exceeded",
        )
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", min(256, room), 1, MAX_TOKENS_LIMIT, integer=True)
    if max_tokens > room:
        raise APIError(
            400,
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds this model's context "
            f"of {engine.max_context} tokens",
            "max_tokens",
            "context_length_exceeded",
        )
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        top_k=_number(body, "top_k", 0, 0, 100_000, integer=True),
        stop=stop,
        seed=seed,
    )


def chat_prompt(body: dict, engine: Engine) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    cleaned = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{index}].role must be 'system', 'user' or 'assistant'", f"messages[{index}]")
        content = message.get("content")
        if isinstance(content, list):  # the list-of-parts form: text parts only
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise APIError(400, f"messages[{index}].content must be a string", f"messages[{index}].content")
        cleaned.append({"role": message["role"], "content": content})
    return engine.chat_prompt(cleaned)


def create_app(
    engine: Engine, model_name: str, api_key: str | None = None, max_batch: int = 16, batching: str = "continuous"
) -> Any:
    app = FastAPI(title="atomlab", docs_url=None, redoc_url=None)
    scheduler = Scheduler(engine, max_batch, continuous=batching == "continuous")
    started = int(time.time())
    token_text = functools.cache(lambda token: token_bytes(engine.tokenizer, token))

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def authorize(request: HTTPRequest) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer KEY')",
                None,
                "invalid_api_key",
                "authentication_error",
            )

    async def read_body(request: HTTPRequest) -> dict:
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model", model_name) != model_name:
            raise APIError(
                404,
                f"the model '{body.get('model')}' does not exist; this server has '{model_name}'",
                "model",
                "model_not_found",
            )
        return body

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models(request: HTTPRequest) -> dict:
        authorize(request)
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "atomlab"}],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (resources.files("atomlab.infer") / "chat.html").read_text(encoding="utf-8")

    def logprobs_json(entries: list[TokenLogprob] | None, kind: str, offset: int = 0) -> dict | None:
        """OpenAI's shapes: chat {"content": [{token, logprob, bytes, top_logprobs}]}; text completions
        {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}."""
        if entries is None:
            return None
        if kind == "chat":

            def one(token: int, logprob: float) -> dict:
                text, raw = token_text(token)
                return {"token": text, "logprob": logprob, "bytes": list(raw)}

            content = [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
            return {"content": content, "refusal": None}
        tokens = [token_text(e.token_id)[0] for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t)[0]: lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    async def run(request: HTTPRequest, body: dict, prompt: list[int], kind: Literal["chat", "text"]) -> Any:
        check_fields(body, kind)
        n = choices(body)
        params = replace(sampling_params(body, engine, len(prompt)), logprobs=logprobs_wanted(body, kind))
        try:
            job = scheduler.submit(Request(prompt, params), n)
        except AtomlabError as exc:
            raise APIError(400, str(exc), "prompt" if kind == "text" else "messages") from None
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                stream(job, ident, kind, usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        results: dict[int, tuple[Completion, list[TokenLogprob]]] = {}
        try:
            checked = time.monotonic()
            while len(results) < n:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    event = None
                # text pieces keep arriving while the sequence runs: look for a gone client every 0.5 s anyway
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return None
                if event is None:
                    continue
                if event[0] == "error":
                    raise APIError(500, f"generation failed: {event[2]}", kind="server_error")
                if event[0] == "done":
                    results[event[1]] = (event[2], event[3])
        finally:
            job.cancelled = True  # nothing more is wanted: a generation still running stops at the next step
        return response([results[i] for i in range(n)], ident, kind, params.logprobs is not None)

    def usage_of(completions: list[Completion]) -> dict:
        prompt = completions[0].prompt_tokens
        generated = sum(c.completion_tokens for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def response(results: list[tuple[Completion, list[TokenLogprob]]], ident: str, kind: str, logprobs: bool) -> dict:
        choices = []
        for index, (result, entries) in enumerate(results):
            reported = logprobs_json(entries if logprobs else None, kind)
            if kind == "chat":
                message = {"role": "assistant", "content": result.text}
                choices.append(
                    {"index": index, "message": message, "logprobs": reported, "finish_reason": result.finish_reason}
                )
            else:
                choices.append(
                    {"index": index, "text": result.text, "logprobs": reported, "finish_reason": result.finish_reason}
                )
        return {
            "id": ident,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": usage_of([result for result, _ in results]),
        }

    async def stream(job: Job, ident: str, kind: str, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        n = len(job.generations)
        received = [0] * n  # log-probabilities sent so far, per choice
        offsets = [0] * n  # text_offset of the next token, per choice
        wants_logprobs = job.generations[0].logprobs is not None

        def chunk(index: int, text: str | None, finish: str | None = None, entries: list | None = None) -> str:
            reported = None
            if wants_logprobs and entries is not None:
                reported = logprobs_json(entries, kind, offsets[index])
                received[index] += len(entries)
                offsets[index] += sum(len(token_text(e.token_id)[0]) for e in entries)
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": reported, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": reported, "finish_reason": finish}
            data = {
                "id": ident,
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": created,
                "model": model_name,
                "choices": [choice],
            }
            return f"data: {json.dumps(data)}\n\n"

        finished: list[Completion] = []
        try:
            if kind == "chat":
                for index in range(n):
                    data = json.loads(chunk(index, "")[6:])
                    data["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield f"data: {json.dumps(data)}\n\n"
            while len(finished) < n:
                event = await job.events.get()
                if event[0] == "error":
                    yield f"data: {json.dumps(APIError(500, str(event[2]), kind='server_error').body())}\n\n"
                    break
                if event[0] == "done":
                    _, index, completion, entries = event
                    finished.append(completion)
                    yield chunk(index, None, completion.finish_reason, entries[received[index] :])
                else:
                    _, index, piece, entries = event
                    yield chunk(index, piece, None, entries)
            else:
                if include_usage:
                    data = {
                        "id": ident,
                        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": usage_of(finished),
                    }
                    yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the response is cancelled) or everything was sent
            job.cancelled = True

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        body = await read_body(request)
        return await run(request, body, chat_prompt(body, engine), "chat")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return await run(request, body, prompt, "text")  # token ids, as OpenAI accepts them
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string or a list of token ids", "prompt")
        return await run(request, body, engine.encode(prompt), "text")

    return app


@functools.cache
def _byte_level_decoding() -> dict[str, int]:
    """GPT-2's byte-level alphabet (used by atomlab's and most BPE tokenizers), character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + extra)] = byte
            extra += 1
    return characters


def token_bytes(tokenizer: Any, token: int) -> tuple[str, bytes]:
    """A token's text and its bytes, as OpenAI reports them beside log-probabilities (a token can be part
    of a UTF-8 character: its text then shows the bytes that are whole characters, and U+FFFD)."""
    piece = tokenizer.id_to_token(token) or ""
    alphabet = _byte_level_decoding()
    if piece and all(character in alphabet for character in piece) and tokenizer.token_to_id(piece) == token:
        raw = bytes(alphabet[character] for character in piece)
    elif match := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece byte fallback
        raw = bytes([int(match.group(1), 16)])
    else:
        raw = tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
    return raw.decode("utf-8", errors="replace"), raw


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    engine = Engine.from_bundle(args.bundle, device=args.device)
    name = args.model_name or engine_name(args.bundle)
    api_key = args.api_key or os.environ.get("ATOMLAB_API_KEY") or None
    app = create_app(engine, name, api_key=api_key, max_batch=args.max_batch, batching=args.batching)
    print(
        f"serving {name} on http://{args.host}:{args.port} (OpenAI API under /v1, web chat at /)"
        + ("; API key required" if api_key else "")
        + f"; {args.batching} batching",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def engine_name(bundle: str) -> str:
    try:
        return json.loads((Path(bundle) / "config.json").read_text())["model_name"]
    except (OSError, KeyError, ValueError):
        return "atomlab"


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve a bundle behind an OpenAI-compatible API with a web chat")
    serve.add_argument("bundle", help="a release bundle folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set ATOMLAB_API_KEY)")
    serve.add_argument("--model-name", help="the model id clients ask for (default: the bundle's model_name)")
    serve.add_argument("--max-batch", type=int, default=16, help="sequences decoded together at most")
    serve.add_argument(
        "--batching",
        choices=("continuous", "static"),
        default="continuous",
        help="continuous: requests join the running batch at the next step (default); static: a batch runs to its end",
    )
    serve.add_argument("--device", default="auto")
    serve.set_defaults(handler=run_serve)
