"""Held-out environment accuracy: greedy pass@1, pass@k from sampled replies, confidence intervals,
and the paired comparison of two models on the same tasks.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
pass@k = 1 - C(n-c, k) / C(n, k), averaged over tasks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from atomlab.chat_format import ChatFormat
from atomlab.envs import Task, load_environment
from atomlab.envs.rollout import engine_responder, run_episodes
from atomlab.infer.engine import Engine
from atomlab.model import Transformer

Z95 = 1.959963984540054


def pass_at_k(samples: int, correct: int, k: int) -> float:
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of a proportion; sound near 0 and 1, unlike the normal approximation."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(first: list[float], second: list[float], z: float = Z95) -> dict[str, float]:
    """Mean of second - first over the same tasks, with a 95% interval from the paired differences."""
    diff = np.asarray(second, dtype=np.float64) - np.asarray(first, dtype=np.float64)
    mean = float(diff.mean())
    half = z * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else float("inf")
    return {"difference": mean, "ci_low": mean - half, "ci_high": mean + half, "tasks": len(diff)}


def greedy_rollouts(engine: Engine, env: Any, tasks: list[Task], max_tokens: int, seed: int) -> list[Any]:
    """One greedy episode of each task, in task order."""
    return run_episodes(env, tasks, engine_responder(engine, max_tokens, 0.0, seed), samples=1)


class HeldOutAccuracy:
    """Greedy pass@1 of a model on held-out tasks, per environment, as the training loop logs it at each
    validation ({"arithmetic-v1/pass@1": 0.42}); prompted in `chat_format`, replies up to max_tokens."""

    def __init__(self, tasks: list[Task], chat_format: ChatFormat, max_tokens: int, seed: int) -> None:
        self.tasks, self.chat_format, self.max_tokens, self.seed = tasks, chat_format, max_tokens, seed

    def __call__(self, model: Transformer) -> dict[str, float]:
        device = model.embed_tokens.weight.device
        engine = Engine(model, self.chat_format.tokenizer, device, self.chat_format)
        accuracy = {}
        for env_id in dict.fromkeys(task.env for task in self.tasks):
            mine = [task for task in self.tasks if task.env == env_id]
            rollouts = greedy_rollouts(engine, load_environment(env_id), mine, self.max_tokens, self.seed)
            accuracy[f"{env_id}/pass@1"] = round(float(np.mean([r.reward >= 1.0 for r in rollouts])), 6)
        return accuracy


def score_model(
    model: Transformer,
    tokenizer: Any,
    tasks: list[Task],
    *,
    samples: int,
    max_tokens: int,
    seed: int,
    device: torch.device | None = None,
    chat_format: ChatFormat | None = None,
) -> dict[str, Any]:
    """Greedy and sampled accuracy of one model on tasks (of one or more environments), prompted in
    `chat_format` and stopping at its stop tokens (default: atomlab's)."""
    engine = Engine(model, tokenizer, device or torch.device("cpu"), chat_format)
    results: dict[str, Any] = {"environments": {}}
    for env_id in dict.fromkeys(task.env for task in tasks):
        env = load_environment(env_id)
        mine = [task for task in tasks if task.env == env_id]
        greedy = greedy_rollouts(engine, env, mine, max_tokens, seed)
        correct = [1.0 if r.reward >= 1.0 else 0.0 for r in greedy]
        sampled = run_episodes(env, mine, engine_responder(engine, max_tokens, 1.0, seed + 1), samples=samples)
        hits: dict[str, int] = {task.id: 0 for task in mine}
        for rollout in sampled:
            hits[rollout.task.id] += rollout.reward >= 1.0
        low, high = wilson_interval(int(sum(correct)), len(correct))
        reasons: dict[str, int] = {}
        for rollout in greedy:
            key = "correct" if rollout.reward >= 1.0 else rollout.reason.split(" '")[0].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        results["environments"][env_id] = {
            "tasks": len(mine),
            "pass@1": float(np.mean(correct)),
            "pass@1_ci95": [low, high],
            "sampled_pass@1": float(np.mean([pass_at_k(samples, hits[t.id], 1) for t in mine])),
            "pass@k": float(np.mean([pass_at_k(samples, hits[t.id], samples) for t in mine])),
            "samples": samples,  # k
            "greedy_outcomes": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "correct": correct,
            "examples": [
                {"prompt": r.transcript[0]["content"], "reply": r.transcript[-1]["content"], "reward": r.reward}
                for r in greedy[:3]
            ],
        }
    return results
