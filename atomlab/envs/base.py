"""The environment interface: seeded tasks, a strict verifier, difficulty levels, multi-turn hook.

An environment is a generator of tasks plus a verifier. The same (environment id, seed, index,
difficulty) gives the same task forever: the task's random generator is seeded from exactly
those four values, never from global state. Responses are judged strictly: the answer must
stand in one place in one format (`<answer>...</answer>`, optionally after one
`<think>...</think>`), nothing else may surround it, and it must equal the gold answer in its
canonical form. No partial credit for substrings; huge, empty or malformed replies score 0
quickly and never raise.

Conventions follow Gymnasium where they fit: versioned ids (`arithmetic-v1`), `reset(seed=...)`
starts an episode, `episode.step(text)` returns (observation, reward, terminated, truncated, info).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

MAX_RESPONSE_CHARS = 8192  # longer replies score 0 without being parsed
FORMAT_HINT = "Reply with the answer in <answer></answer>."

# One optional <think> block, then exactly one <answer> block, only whitespace around them.
# The tempered dots stop at any other tag, so a second answer or a nested tag fails to match.
_RESPONSE = re.compile(
    r"\s*(?:<think>(?:(?!</?think>|</?answer>).)*</think>\s*)?"
    r"<answer>((?:(?!</?answer>|</?think>).)*)</answer>\s*",
    re.DOTALL,
)


@dataclass(frozen=True)
class Verdict:
    reward: float  # in [0, 1]
    reason: str


@dataclass(frozen=True)
class Task:
    env: str  # versioned environment id, e.g. "arithmetic-v1"
    seed: int
    index: int
    difficulty: int
    messages: list[dict[str, str]]  # the prompt, as chat messages
    answer: str  # the gold answer, in the canonical form the verifier expects
    solution: str  # a complete gold reply in the required format (SFT data)
    data: dict[str, Any] = field(default_factory=dict)  # what the verifier needs beyond the answer

    @property
    def id(self) -> str:
        return f"{self.env}/seed{self.seed}/level{self.difficulty}/{self.index}"

    @property
    def prompt_hash(self) -> str:
        return prompt_hash(self.messages)


def prompt_hash(messages: list[dict[str, str]]) -> str:
    """Hash of a prompt's messages: two prompts with the same hash ask the same question, whichever
    environment or file they came from (decontamination compares these)."""
    text = "\x1e".join(f"{m.get('role')}\x1f{' '.join(str(m.get('content')).split())}" for m in messages)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def extract_answer(response: str) -> tuple[str | None, str]:
    """The text inside the single <answer> block, or None and why the reply is malformed."""
    if not isinstance(response, str):
        return None, "reply is not text"
    if len(response) > MAX_RESPONSE_CHARS:
        return None, f"reply longer than {MAX_RESPONSE_CHARS} characters"
    if not response.strip():
        return None, "empty reply"
    match = _RESPONSE.fullmatch(response)
    if match is None:
        if response.count("<answer>") > 1:
            return None, "more than one <answer> block"
        if "<answer>" not in response:
            return None, "no <answer>...</answer> block"
        return None, "text outside the <answer> block (only one <think> block may precede it)"
    return match.group(1).strip(), "ok"


def answer_tag(answer: str) -> str:
    return f"<answer>{answer}</answer>"


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


class Environment:
    """Base of every environment. Subclasses set `name`, `version`, `description`, `levels`
    and implement `make`; most keep the default `verify` (exact match of the canonical answer)."""

    name: str = ""
    version: int = 1
    description: str = ""
    levels: int = 3  # difficulty levels 1..levels, for curricula
    max_turns: int = 1  # > 1: the environment may answer the model (`reply`) before the final verdict

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    def rng(self, seed: int, index: int, difficulty: int) -> random.Random:
        # str seeds go through SHA-512 in random.seed: stable across processes and Python versions
        return random.Random(f"{self.id}:{seed}:{index}:{difficulty}")

    def task(self, seed: int, index: int, difficulty: int = 1) -> Task:
        if not 1 <= difficulty <= self.levels:
            raise ValueError(f"{self.id}: difficulty must be 1..{self.levels}, got {difficulty}")
        prompt, answer, solution, data = self.make(self.rng(seed, index, difficulty), difficulty)
        return Task(self.id, seed, index, difficulty, [user(prompt)], answer, solution, data)

    def tasks(self, seed: int, count: int, difficulty: int = 1, start: int = 0) -> list[Task]:
        return [self.task(seed, index, difficulty) for index in range(start, start + count)]

    def make(self, rng: random.Random, difficulty: int) -> tuple[str, str, str, dict[str, Any]]:
        """(prompt text, gold answer, gold reply, verifier data) for one task."""
        raise NotImplementedError

    def check(self, task: Task, answer: str) -> Verdict:
        """Judge an extracted answer. Default: exact equality with the canonical gold answer."""
        if answer == task.answer:
            return Verdict(1.0, "correct")
        return Verdict(0.0, f"wrong answer {answer[:40]!r}")

    def verify(self, task: Task, response: str) -> Verdict:
        """Reward in [0, 1] and the reason, for the model's final reply. Never raises."""
        answer, why = extract_answer(response)
        if answer is None:
            return Verdict(0.0, why)
        try:
            verdict = self.check(task, answer)
        except Exception as exc:  # a verifier bug must not crash a training run
            return Verdict(0.0, f"verifier error: {type(exc).__name__}")
        return Verdict(min(1.0, max(0.0, float(verdict.reward))), verdict.reason)

    def reply(self, task: Task, messages: list[dict[str, str]]) -> str | None:
        """Multi-turn hook: the environment's answer to the model's last message (e.g. a tool result),
        or None when that message is the final reply to verify."""
        return None

    def reset(self, seed: int, index: int = 0, difficulty: int = 1) -> Episode:
        return Episode(self, self.task(seed, index, difficulty))


class Episode:
    """One rollout of one task. `observation` is the conversation so far."""

    def __init__(self, env: Environment, task: Task) -> None:
        self.env, self.task = env, task
        self.observation: list[dict[str, str]] = [dict(m) for m in task.messages]
        self.turns = 0
        self.done = False

    def step(self, text: str) -> tuple[list[dict[str, str]], float, bool, bool, dict[str, Any]]:
        if self.done:
            raise RuntimeError(f"{self.task.id}: episode already finished; reset for a new one")
        self.turns += 1
        self.observation.append({"role": "assistant", "content": text})
        answer = None if len(text) > MAX_RESPONSE_CHARS else self.env.reply(self.task, self.observation)
        if answer is not None and self.turns < self.env.max_turns:
            self.observation.append(user(answer))
            return self.observation, 0.0, False, False, {"turn": self.turns}
        self.done = True
        if answer is not None:  # the model still wanted the environment after its last turn
            return self.observation, 0.0, False, True, {"turn": self.turns, "reason": "out of turns"}
        verdict = self.env.verify(self.task, text)
        return self.observation, verdict.reward, True, False, {"turn": self.turns, "reason": verdict.reason}
