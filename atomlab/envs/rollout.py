"""Rollouts: run episodes of an environment against any generator, and a client for chat endpoints.

`run_episodes(env, tasks, respond, samples)` is the one loop for every way of generating (an
OpenAI-compatible server, the local engine, a stub in tests): `respond` takes a batch of
conversations and returns one assistant reply for each, and the loop steps every unfinished
episode one turn at a time, so multi-turn environments (tool calls) work with any generator and
each turn is one batch.

`openai_responder(base_url, model, ...)` is such a `respond` for any `/v1/chat/completions`
endpoint (atomlab serve, vLLM, llama.cpp, hosted APIs), standard library only: a thread pool keeps
up to `concurrency` requests in flight, 429 and 5xx answers are retried with backoff, and a refused
connection, a rejected key or a malformed answer is one AtomlabError that names the URL.

`atomlab envs rollout NAME --base-url URL --model M` runs it from the command line, prints the
accuracy (mean reward) and writes each rollout as a JSON line with --out.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import ipaddress
import itertools
import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atomlab.envs.base import Environment, Episode, Task
from atomlab.errors import AtomlabError

if TYPE_CHECKING:
    from atomlab.infer.engine import Engine

Conversation = list[dict[str, str]]
Respond = Callable[[list[Conversation]], list[str]]
RETRY_STATUSES = (429, 500, 502, 503, 504)


class SampledReply(str):
    """A reply's text that also carries the token ids it was sampled as (the engine's replies): the prompt
    the model saw, every sampled token (ending with an end token only if the model produced one) and why
    sampling ended ("stop" or "length"). Training on these ids, not on re-encoded text, trains exactly
    what was sampled."""

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str

    def __new__(cls, text: str, prompt_ids: list[int], token_ids: list[int], finish_reason: str) -> SampledReply:
        reply = super().__new__(cls, text)
        reply.prompt_ids, reply.token_ids, reply.finish_reason = prompt_ids, token_ids, finish_reason
        return reply

    def __reduce__(self) -> tuple:  # pickles (to other processes) with its ids
        return SampledReply, (str(self), self.prompt_ids, self.token_ids, self.finish_reason)


@dataclass(frozen=True)
class Rollout:
    task: Task
    sample: int  # which of the task's samples, 0..samples-1
    transcript: Conversation  # the whole conversation: prompt, replies and the environment's answers
    reward: float
    reason: str
    turns: int  # assistant replies in the transcript
    truncated: bool  # the model was still calling the environment when its turns ran out
    replies: tuple[str, ...] = ()  # each assistant turn as the generator returned it (SampledReply from the engine)

    def record(self) -> dict[str, Any]:
        """One JSON line of a rollouts file."""
        task = self.task
        return {
            "task": task.id,
            "env": task.env,
            "seed": task.seed,
            "index": task.index,
            "difficulty": task.difficulty,
            "sample": self.sample,
            "reward": self.reward,
            "reason": self.reason,
            "turns": self.turns,
            "truncated": self.truncated,
            "answer": task.answer,
            "messages": self.transcript,
        }


def run_episodes(
    env: Environment,
    tasks: Sequence[Task],
    respond: Respond,
    samples: int = 1,
    progress: Callable[[Rollout], None] | None = None,
) -> list[Rollout]:
    """Roll out `samples` episodes of each task; the rollouts come back in task order, then sample order.
    `progress` is called with each rollout as it finishes. A `respond` with `takes_keys` set is also given
    each conversation's key "task id/sample/turn", so it can sample independently of batching."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    episodes = [(sample, Episode(env, task)) for task in tasks for sample in range(samples)]
    rollouts: list[Rollout | None] = [None] * len(episodes)
    returned: list[list[str]] = [[] for _ in episodes]
    active = list(range(len(episodes)))
    while active:
        conversations = [list(episodes[i][1].observation) for i in active]
        if getattr(respond, "takes_keys", False):
            keys = [f"{episodes[i][1].task.id}/{episodes[i][0]}/{episodes[i][1].turns}" for i in active]
            replies = respond(conversations, keys=keys)
        else:
            replies = respond(conversations)
        if len(replies) != len(active):
            raise AtomlabError(f"the generator returned {len(replies)} replies for {len(active)} conversations")
        still = []
        for i, text in zip(active, replies, strict=True):
            sample, episode = episodes[i]
            returned[i].append(text if isinstance(text, str) else "")
            _, reward, _, truncated, info = episode.step(text if isinstance(text, str) else "")
            if not episode.done:
                still.append(i)
                continue
            rollout = Rollout(
                episode.task,
                sample,
                list(episode.observation),
                reward,
                info.get("reason", ""),
                episode.turns,
                truncated,
                tuple(returned[i]),
            )
            rollouts[i] = rollout
            if progress is not None:
                progress(rollout)
        active = still
    return [rollout for rollout in rollouts if rollout is not None]


def run_tasks(
    tasks: Sequence[Task],
    respond: Respond,
    samples: int = 1,
    environments: dict[str, Environment] | None = None,
) -> list[Rollout]:
    """`run_episodes` over tasks of any number of environments (each environment's tasks rolled out
    together), the rollouts back in task order, then sample order. `environments` maps ids to
    instances already loaded; others are loaded from the registry."""
    from atomlab.envs.registry import load_environment

    by_environment: dict[str, list[Task]] = {}
    for task in tasks:
        by_environment.setdefault(task.env, []).append(task)
    found: dict[tuple[str, int], Rollout] = {}
    for env_id, mine in by_environment.items():
        env = (environments or {}).get(env_id) or load_environment(env_id)
        for rollout in run_episodes(env, mine, respond, samples):
            found[(rollout.task.id, rollout.sample)] = rollout
    return [found[(task.id, sample)] for task in tasks for sample in range(samples)]


class EngineResponder:
    """A `respond` of atomlab's generation engine: calls of up to `batch` conversations per turn, each reply a
    SampledReply. Sampling seeds follow (seed, call, position), so the same rollout order gives the same
    replies; with `keyed`, they follow (seed, the conversation's key) instead, so a reply does not depend on
    which other conversations share its call (or its process, when rollouts are split across processes)."""

    def __init__(
        self, engine: Engine, max_tokens: int, temperature: float, seed: int, batch: int = 256, keyed: bool = False
    ) -> None:
        self.engine, self.max_tokens, self.temperature, self.seed, self.batch = (
            engine,
            max_tokens,
            temperature,
            seed,
            batch,
        )
        self.takes_keys = keyed
        self.calls = itertools.count()

    def seed_of(self, call: int, position: int, key: str | None) -> int:
        if key is None:
            return (self.seed * 1_000_003 + call * 10_007 + position) % 2**31
        return int.from_bytes(hashlib.sha256(f"{self.seed}:{key}".encode()).digest()[:4], "big") % 2**31

    def __call__(self, conversations: list[Conversation], keys: list[str] | None = None) -> list[str]:
        from atomlab.infer.engine import Request, SamplingParams

        call = next(self.calls)
        prompts = [self.engine.chat_prompt(conversation) for conversation in conversations]
        requests = [
            Request(
                prompt,
                SamplingParams(
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                    seed=self.seed_of(call, i, None if keys is None else keys[i]),
                ),
            )
            for i, prompt in enumerate(prompts)
        ]
        replies: list[str] = []
        for first in range(0, len(requests), self.batch):
            chunk = requests[first : first + self.batch]
            for request, done in zip(chunk, self.engine.generate(chunk), strict=True):
                replies.append(SampledReply(done.text, request.prompt, done.token_ids, done.finish_reason))
        return replies


# The name for what it is used as: `respond = engine_responder(engine, max_tokens, temperature, seed)`.
engine_responder = EngineResponder


def chat_completions_url(base_url: str) -> str:
    """`http://host:port` gets /v1/chat/completions; a URL with a path (`.../v1`, as the OpenAI
    clients take it) gets /chat/completions; a full .../chat/completions URL is kept."""
    url = base_url.strip().rstrip("/")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise AtomlabError(f"--base-url must be an http:// or https:// URL, got {base_url!r}")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if parsed.path else "/v1/chat/completions")


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class OpenAIResponder:
    """A `respond` function that asks an OpenAI-compatible server, `concurrency` requests at a time.
    With `seed`, request n of this responder is sampled with seed + n (reproducible where the server
    honours seeds, and different for each sample of the same prompt)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_tokens: int = 512,
        temperature: float = 1.0,
        seed: int | None = None,
        concurrency: int = 8,
        timeout: float = 300.0,
        retries: int = 4,
    ) -> None:
        if concurrency < 1:
            raise AtomlabError(f"concurrency must be at least 1, got {concurrency}")
        self.url = chat_completions_url(base_url)
        self.model, self.api_key, self.max_tokens, self.temperature = model, api_key, max_tokens, temperature
        self.seed, self.concurrency, self.timeout, self.retries = seed, concurrency, timeout, retries
        self.requests = 0  # made so far; request n samples with seed + n, so repeated prompts still differ
        self._lock = threading.Lock()
        # Proxies from the environment apply, except to this machine (a local server behind a proxy never works).
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.url) else []
        self._opener = urllib.request.build_opener(*handlers)

    def __call__(self, conversations: list[Conversation]) -> list[str]:
        if not conversations:
            return []
        with self._lock:
            first, self.requests = self.requests, self.requests + len(conversations)
        seeds = [None if self.seed is None else self.seed + first + i for i in range(len(conversations))]
        workers = min(self.concurrency, len(conversations))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="atomlab-rollout")
        try:
            futures = [pool.submit(self.complete, c, s) for c, s in zip(conversations, seeds, strict=True)]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error, start nothing more

    def complete(self, messages: Conversation, seed: int | None = None) -> str:
        """One chat completion: the assistant's text."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if seed is not None:
            body["seed"] = seed
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8")
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code in RETRY_STATUSES and not last:
                    self._wait(attempt, exc.headers.get("Retry-After"))
                    continue
                raise self._http_error(exc) from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, ConnectionRefusedError):
                    raise AtomlabError(f"{self.url}: connection refused (is the server running?)") from None
                if not isinstance(exc.reason, TimeoutError | ConnectionError) or last:
                    raise AtomlabError(f"cannot reach {self.url}: {exc.reason}") from None
            except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                if last:
                    raise AtomlabError(f"{self.url}: {type(exc).__name__}: {exc} ({attempt + 1} tries)") from None
            self._wait(attempt, None)
        raise AssertionError("unreachable")

    def _content(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"].get("content")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise AtomlabError(
                f"{self.url}: malformed response (expected choices[0].message.content): {raw[:200]!r}"
            ) from None
        if isinstance(content, list):  # the list-of-parts form
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if content is not None and not isinstance(content, str):
            raise AtomlabError(f"{self.url}: malformed response: message content is {type(content).__name__}")
        return content or ""

    def _http_error(self, exc: urllib.error.HTTPError) -> AtomlabError:
        text = exc.read()[:2000].decode("utf-8", "replace")
        try:
            message = json.loads(text)["error"]["message"]
        except (json.JSONDecodeError, KeyError, TypeError):
            message = text.strip()[:300] or exc.reason
        if exc.code in (401, 403):
            return AtomlabError(
                f"{self.url} refused the request ({exc.code}): {message}; pass the server's key with --api-key "
                "(or ATOMLAB_API_KEY)"
            )
        return AtomlabError(f"{self.url} answered {exc.code}: {message}")

    @staticmethod
    def _wait(attempt: int, retry_after: str | None) -> None:
        try:
            delay = min(60.0, float(retry_after)) if retry_after else 0.0
        except ValueError:
            delay = 0.0
        # exponential backoff with jitter, so clients that failed together do not retry together
        time.sleep(delay or min(30.0, 0.5 * 2**attempt) * (1 + 0.25 * random.random()))


# The name for what it is used as: `respond = openai_responder(url, model, ...)`.
openai_responder = OpenAIResponder


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_rollout(args: argparse.Namespace) -> int:
    from atomlab.envs.registry import load_environment
    from atomlab.progress import progress_bar

    env = load_environment(args.name)
    if not 1 <= args.difficulty <= env.levels:
        raise AtomlabError(f"{env.id}: --difficulty must be 1..{env.levels}, got {args.difficulty}")
    tasks = env.tasks(args.seed, args.count, args.difficulty)
    respond = openai_responder(
        args.base_url,
        args.model,
        api_key=args.api_key or os.environ.get("ATOMLAB_API_KEY"),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        concurrency=args.concurrency,
    )
    total = len(tasks) * args.samples
    finished: list[Rollout] = []
    started = time.monotonic()
    with progress_bar(f"{env.id} rollouts", total) as bar:

        def advance(rollout: Rollout) -> None:
            finished.append(rollout)
            bar.update(len(finished))

        rollouts = run_episodes(env, tasks, respond, args.samples, progress=advance)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for rollout in rollouts:
                handle.write(json.dumps(rollout.record(), ensure_ascii=False) + "\n")
    rewards = [rollout.reward for rollout in rollouts]
    accuracy = sum(rewards) / len(rewards)
    correct = sum(1 for reward in rewards if reward >= 1.0)
    turns = sum(rollout.turns for rollout in rollouts) / len(rollouts)
    print(
        f"{env.id} level {args.difficulty}: accuracy {accuracy:.3f} ({correct}/{len(rollouts)} correct; "
        f"{len(tasks)} tasks x {args.samples} samples; {turns:.1f} turns each; "
        f"{respond.requests} requests in {time.monotonic() - started:.1f}s)"
        + (f"; rollouts in {args.out}" if args.out else "")
    )
    sys.stdout.flush()
    return 0


def register(envs_commands: argparse._SubParsersAction) -> None:
    """Add `atomlab envs rollout` to the `envs` subcommands."""
    rollout = envs_commands.add_parser(
        "rollout",
        help="run an environment's tasks against an OpenAI-compatible chat endpoint and report the accuracy",
        description="Roll out an environment against an OpenAI-compatible /v1/chat/completions endpoint.",
    )
    rollout.add_argument("name", help="environment name, e.g. arithmetic, calculator, code, reasoning-gym:DATASET")
    rollout.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 or .../v1")
    rollout.add_argument("--model", required=True, help="the model name the server expects")
    rollout.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (default: $ATOMLAB_API_KEY)")
    rollout.add_argument("--count", type=_positive, default=20, help="tasks (default 20)")
    rollout.add_argument("--seed", type=int, default=0, help="task seed; also the sampling seed (default 0)")
    rollout.add_argument("--difficulty", type=int, default=1, help="level, 1..the environment's levels (default 1)")
    rollout.add_argument("--samples", type=_positive, default=1, help="rollouts per task (default 1)")
    rollout.add_argument("--concurrency", type=_positive, default=8, help="requests in flight (default 8)")
    rollout.add_argument("--max-tokens", type=_positive, default=512, help="per reply (default 512)")
    rollout.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    rollout.add_argument("--out", help="write each rollout as a JSON line to this file")
    rollout.set_defaults(handler=_run_rollout)
