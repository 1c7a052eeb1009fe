"""The rl step: GRPO with verifiable rewards from atomlab environments.

Each step takes `rl.batch_size` training tasks and samples `rl.group_size` replies to each with
the generation engine (KV cache, one batch). The environment scores every reply; a reply's
advantage is its reward minus its group's mean, over the group's standard deviation. Groups where
every reply scored the same teach nothing and are skipped. The loss is PPO's clipped surrogate
on the assistant tokens, averaged over tokens, plus an optional KL penalty (the k3 estimator) to
the starting model. A curriculum raises the difficulty when recent accuracy reaches a threshold.

Rollouts go through `atomlab.envs.rollout.run_episodes`, the same loop that rolls out against
OpenAI-compatible endpoints, so multi-turn environments train the same way; log-probabilities
are recomputed on the re-encoded transcript, which keeps the update independent of who generated.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atomlab.envs import Task
from atomlab.envs.rollout import Rollout, engine_responder, run_tasks
from atomlab.errors import AtomlabError
from atomlab.infer.engine import Engine, load_model
from atomlab.posttrain.tasks import (
    check_difficulty,
    environments,
    held_out_hashes,
    training_tasks,
    write_trained_prompts,
)
from atomlab.progress import progress_bar
from atomlab.recipe import Recipe
from atomlab.steps import StepContext, write_json
from atomlab.tokenizer import encode_chat, load_tokenizer
from atomlab.train.checkpoint import save_weights
from atomlab.train.loop import build_optimizer, learning_rate, pick_device, use_deterministic
from atomlab.train.metrics import MetricsLogger


def group_advantages(rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per reply: (reward - group mean) / group std; and which groups carry signal (std > 0).
    `rewards` has one row per task and one column per sample."""
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    useful = std[:, 0] > 1e-6
    advantages = np.where(std > 1e-6, (rewards - mean) / np.maximum(std, 1e-6), 0.0)
    return advantages, useful


def token_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs).float()
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def pack_rollouts(
    rollouts: list[Rollout], tokenizer: Any, seq_len: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Transcripts as right-padded (inputs, targets, mask of the assistant tokens to train)."""
    encoded = []
    for rollout in rollouts:
        ids, mask = encode_chat(tokenizer, rollout.transcript)
        encoded.append((ids[: seq_len + 1], mask[: seq_len + 1]))
    width = max(len(ids) for ids, _ in encoded)
    tokens = torch.full((len(encoded), width), pad, dtype=torch.long)
    trained = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, (ids, mask) in enumerate(encoded):
        tokens[row, : len(ids)] = torch.tensor(ids)
        trained[row, : len(mask)] = torch.tensor(mask)
    return tokens[:, :-1], tokens[:, 1:], trained[:, 1:]


def grpo_loss(
    new: torch.Tensor,
    old: torch.Tensor,
    reference: torch.Tensor | None,
    advantage: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
    kl_coef: float,
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate over the trained tokens (their mean; `tokens` is the count to divide by
    when these rows are one micro-batch of a larger batch), plus kl_coef x the k3 estimate of
    KL(policy || reference). Token log-probs are (rows, tokens), advantages (rows, 1), mask (rows, tokens)."""
    weight = mask.float() / (mask.sum().clamp(min=1) if tokens is None else tokens)
    ratio = torch.exp(new - old)
    clipped = torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
    terms = -torch.minimum(ratio * advantage, clipped * advantage)
    kl = torch.zeros_like(new)
    if reference is not None:
        log_ratio = reference - new
        kl = torch.exp(log_ratio) - log_ratio - 1
        terms = terms + kl_coef * kl
    stats = {
        "kl": float((kl.detach() * weight).sum()),
        "clipped_fraction": float((((ratio - clipped).abs() > 1e-6).float() * weight).sum()),
    }
    return (terms * weight).sum(), stats


MICRO_BATCH = 32  # rollouts per forward/backward: bounds the update's memory whatever the batch


def grpo_update(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantage: torch.Tensor,
    config: Any,
) -> tuple[float, float, dict[str, float]]:
    """`config.updates_per_batch` optimizer steps on one batch of rollouts, each accumulating the
    gradient over micro-batches; the loss is a mean over every trained token of the batch."""
    chunks = [slice(first, first + MICRO_BATCH) for first in range(0, len(inputs), MICRO_BATCH)]
    tokens = mask.sum().clamp(min=1)
    reference_logprobs: list[torch.Tensor | None] = [None] * len(chunks)
    if reference is not None:
        with torch.no_grad():
            reference_logprobs = [token_logprobs(reference, inputs[c], targets[c]) for c in chunks]
    old: list[torch.Tensor | None] = [None] * len(chunks)  # log-probs before any update: the first pass's
    for _ in range(config.updates_per_batch):
        total, stats = 0.0, {"kl": 0.0, "clipped_fraction": 0.0}
        for index, chunk in enumerate(chunks):
            new = token_logprobs(policy, inputs[chunk], targets[chunk])
            old[index] = new.detach() if old[index] is None else old[index]
            loss, part = grpo_loss(
                new,
                old[index],
                reference_logprobs[index],
                advantage[chunk],
                mask[chunk],
                config.clip_ratio,
                config.kl_coef,
                tokens,
            )
            loss.backward()
            total += float(loss.detach())
            stats = {key: stats[key] + part[key] for key in stats}
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip or float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total, grad_norm, {key: round(value, 6) for key, value in stats.items()}


class Curriculum:
    """Difficulty that moves up a level once the mean accuracy of the last `window` steps reaches `threshold`."""

    def __init__(self, start: int, top: int, threshold: float, window: int = 5) -> None:
        self.level, self.top, self.threshold, self.window = start, top, threshold, window
        self.recent: list[float] = []

    def record(self, accuracy: float) -> bool:
        self.recent = [*self.recent, accuracy][-self.window :]
        if self.level < self.top and len(self.recent) == self.window and np.mean(self.recent) >= self.threshold:
            self.level += 1
            self.recent = []
            return True
        return False


def rl(ctx: StepContext, recipe: Recipe) -> dict[str, Any]:
    config = recipe.rl
    start = ctx.inputs["sft"] if "sft" in ctx.inputs else ctx.inputs["pretrain"]
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"] / "tokenizer.json")
    device = pick_device(config.device)
    use_deterministic(config.deterministic)
    if device.type == "cpu" and config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(ctx.seed)
    policy = load_model(start).to(device).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if config.kl_coef > 0 else None
    optimizer = build_optimizer(policy, config, device)
    pad = tokenizer.token_to_id("<|pad|>")
    envs = environments(config.environments, "rl.environments")
    loaded = {env.id: env for env in envs}
    for env in envs:
        check_difficulty(env, min(config.difficulty, env.levels), "rl.difficulty")
    held_out = held_out_hashes(recipe.evaluate, recipe.seed) if recipe.evaluate.environments else set()
    curriculum = Curriculum(config.difficulty, config.max_difficulty, config.promote_at)
    streams: dict[tuple[str, int], Any] = {}

    def next_tasks(count: int) -> list[Task]:
        tasks = []
        for i in range(count):
            env = envs[i % len(envs)]
            level = min(curriculum.level, env.levels)
            key = (env.id, level)
            if key not in streams:  # each level has its own index stream
                streams[key] = training_tasks(env, recipe.seed, level, held_out)
            tasks.append(next(streams[key]))
        return tasks

    # one engine for the whole run: it follows the policy's weights as the optimizer changes them
    engine = Engine(policy, tokenizer, device)
    metrics = MetricsLogger(ctx.folder, truncate_after=0, tensorboard=config.tensorboard, wandb=config.wandb)
    trained_prompts: set[str] = set()
    rollout_tokens = rollout_seconds = 0.0
    last: dict[str, Any] = {}
    with progress_bar("rl", total=config.max_steps) as bar:
        for step in range(config.max_steps):
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tasks = next_tasks(config.batch_size)
            trained_prompts.update(task.prompt_hash for task in tasks)

            began = time.perf_counter()
            policy.eval()
            respond = engine_responder(engine, config.max_tokens, config.temperature, ctx.seed * 1_000_003 + step)
            with torch.no_grad():
                ordered = run_tasks(tasks, respond, config.group_size, loaded)
            policy.train()
            elapsed = time.perf_counter() - began
            rewards = np.array([r.reward for r in ordered], dtype=np.float64).reshape(len(tasks), config.group_size)
            advantages, useful = group_advantages(rewards)

            inputs, targets, mask = pack_rollouts(ordered, tokenizer, policy.args.seq_len, pad)
            reply_tokens = mask.sum(dim=1).float()
            rollout_tokens += float(reply_tokens.sum())
            rollout_seconds += elapsed
            keep = torch.from_numpy(np.repeat(useful, config.group_size))
            record: dict[str, Any] = {
                "step": step + 1,
                "lr": lr,
                "difficulty": curriculum.level,
                "reward": round(float(rewards.mean()), 4),
                "accuracy": round(float((rewards >= 1.0).mean()), 4),
                "response_tokens": round(float(reply_tokens.mean()), 2),
                "useful_groups": int(useful.sum()),
                "rollout_tokens_per_s": round(float(reply_tokens.sum()) / max(elapsed, 1e-9), 1),
            }
            if keep.any():
                inputs, targets, mask = inputs[keep].to(device), targets[keep].to(device), mask[keep].to(device)
                advantage = torch.from_numpy(advantages.reshape(-1)[keep.numpy()]).float().to(device)[:, None]
                loss, grad_norm, stats = grpo_update(
                    policy, reference, optimizer, inputs, targets, mask, advantage, config
                )
                if not math.isfinite(loss):
                    raise AtomlabError(f"rl.lr: loss became {loss} at step {step + 1}; lower rl.lr ({config.lr})")
                record.update(loss=round(loss, 6), grad_norm=round(grad_norm, 5), **stats)
            if curriculum.record(record["accuracy"]):
                bar.log(f"step {step + 1}: accuracy {record['accuracy']:.2f}, difficulty up to {curriculum.level}")
            metrics.log(record)
            last = record
            bar.update(step + 1, reward=record["reward"], tokens_per_s=record["rollout_tokens_per_s"])
    metrics.close()
    policy.eval()
    save_weights(policy, ctx.folder / "model.safetensors")
    write_json(ctx.folder / "config.json", {"architecture": "atomlab-transformer", **policy.args.to_dict()})
    write_trained_prompts(ctx.folder, trained_prompts)
    log = metrics.records
    summary = {
        "steps": config.max_steps,
        "rollouts": config.max_steps * config.batch_size * config.group_size,
        "first_accuracy": log[0]["accuracy"] if log else None,
        "final_accuracy": round(float(np.mean([r["accuracy"] for r in log[-5:]])), 4) if log else None,
        "final_difficulty": curriculum.level,
        "skipped_groups": int(sum(config.batch_size - r["useful_groups"] for r in log)),
        "rollout_tokens_per_s": round(rollout_tokens / max(rollout_seconds, 1e-9), 1),
        "last": last,
    }
    write_json(ctx.folder / "train_summary.json", summary)
    return {k: v for k, v in summary.items() if k != "last"}
