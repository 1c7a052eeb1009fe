"""`atomlab serve BUNDLE`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a web chat page.

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (both with `stream: true` as
server-sent events), `GET /v1/models`, `GET /health`, and the chat page at `/`. Requests are
validated and rejected with OpenAI-style error bodies (`{"error": {"message", "type", "param",
"code"}}`). Concurrent requests are batched: one worker thread owns the engine, takes every
request waiting (up to `max_batch`) and generates them together, streaming each one's text back
to its own connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from atomlab.infer.engine import Completion, Engine, Request, SamplingParams

MAX_TOKENS_LIMIT = 4096


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
    request: Request
    loop: asyncio.AbstractEventLoop
    pieces: asyncio.Queue  # text pieces, then a Completion or an exception
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """One thread runs the engine; requests that arrive while it works are batched together."""

    def __init__(self, engine: Engine, max_batch: int) -> None:
        self.engine, self.max_batch = engine, max_batch
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.batches = self.requests = self.largest_batch = 0
        self.thread = threading.Thread(target=self._work, name="atomlab-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(Request(prompt, params), loop, asyncio.Queue())
        job.request.on_text = lambda text, job=job: job.loop.call_soon_threadsafe(job.pieces.put_nowait, text)
        self.waiting.put(job)
        return job

    def _work(self) -> None:
        while True:
            jobs = [self.waiting.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            self.batches += 1
            self.requests += len(jobs)
            self.largest_batch = max(self.largest_batch, len(jobs))
            try:
                results: list[Any] = self.engine.generate([job.request for job in jobs])
            except Exception as exc:  # report to every waiting client rather than kill the worker
                results = [exc] * len(jobs)
            for job, result in zip(jobs, results, strict=True):
                job.loop.call_soon_threadsafe(job.pieces.put_nowait, result)


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
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "only n = 1 is supported", "n")
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


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_batch: int = 16) -> Any:
    app = FastAPI(title="atomlab", docs_url=None, redoc_url=None)
    batcher = Batcher(engine, max_batch)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                error = APIError(
                    401,
                    "invalid or missing API key (send 'Authorization: Bearer KEY')",
                    None,
                    "invalid_api_key",
                    "authentication_error",
                )
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    async def read_body(request: HTTPRequest) -> dict:
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
        return {
            "status": "ok",
            "model": model_name,
            "batches": batcher.batches,
            "requests": batcher.requests,
            "largest_batch": batcher.largest_batch,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "atomlab"}],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (resources.files("atomlab.infer") / "chat.html").read_text(encoding="utf-8")

    async def run(body: dict, prompt: list[int], kind: Literal["chat", "text"]) -> Any:
        params = sampling_params(body, engine, len(prompt))
        job = batcher.submit(prompt, params)
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if body.get("stream"):
            return StreamingResponse(
                stream(job, ident, kind), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        while True:
            item = await job.pieces.get()
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", kind="server_error")
            if isinstance(item, Completion):
                return response(item, ident, kind)

    def response(result: Completion, ident: str, kind: str) -> dict:
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
            return {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [choice],
                "usage": usage,
            }
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return {
            "id": ident,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [choice],
            "usage": usage,
        }

    async def stream(job: Job, ident: str, kind: str) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: dict | str, finish: str | None = None) -> str:
            if kind == "chat":
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                data = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model_name,
                    "choices": [choice],
                }
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
                data = {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": model_name,
                    "choices": [choice],
                }
            return f"data: {json.dumps(data)}\n\n"

        if kind == "chat":
            yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await job.pieces.get()
            if isinstance(item, Exception):
                yield f"data: {json.dumps(APIError(500, str(item), kind='server_error').body())}\n\n"
                break
            if isinstance(item, Completion):
                yield chunk({} if kind == "chat" else "", item.finish_reason)
                break
            yield chunk({"content": item} if kind == "chat" else item)
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        body = await read_body(request)
        return await run(body, chat_prompt(body, engine), "chat")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", "prompt")
        return await run(body, engine.encode(prompt), "text")

    return app


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    engine = Engine.from_bundle(args.bundle, device=args.device)
    name = args.model_name or engine_name(args.bundle)
    api_key = args.api_key or os.environ.get("ATOMLAB_API_KEY") or None
    app = create_app(engine, name, api_key=api_key, max_batch=args.max_batch)
    print(
        f"serving {name} on http://{args.host}:{args.port} (OpenAI API under /v1, web chat at /)"
        + ("; API key required" if api_key else ""),
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
    serve.add_argument("--max-batch", type=int, default=16, help="requests generated together at most")
    serve.add_argument("--device", default="auto")
    serve.set_defaults(handler=run_serve)
