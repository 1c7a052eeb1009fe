"""The rl step: GRPO with verifiable rewards from atomlab environments, as an objective of the one
training loop (atomlab.train.loop.fit), so it has checkpoints with exact resume, DDP/FSDP2 across
processes and bf16 autocast where the hardware has it, as pretraining and SFT do.

Each step takes `rl.batch_size` training tasks; every process samples `rl.group_size` replies to
its share of them with the generation engine (KV cache, one batch), and the environment scores
every reply. Rewards are gathered from all processes, so a reply's advantage is its reward minus
its group's mean over the group's standard deviation, whoever generated it. Groups where every
reply scored the same teach nothing and are skipped. The loss is PPO's clipped surrogate on the
sampled reply tokens, a mean over every trained token of the step (all processes), plus an optional
KL penalty (the k3 estimator) to the starting model. A curriculum raises the difficulty when recent
accuracy reaches a threshold.

Rollouts go through `atomlab.envs.rollout.run_tasks`, the loop that also rolls out against
OpenAI-compatible endpoints, so multi-turn environments train the same way (each turn is a row).
The update trains on the token ids the engine sampled, not on re-encoded text: a reply cut at
`rl.max_tokens` keeps no end token it did not produce, and log-probabilities are those of the
sampling distribution (logits / temperature). Sampling seeds follow (seed, step, task, sample,
turn), so the rollouts are the same on any number of processes.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atomlab.chat_format import ChatFormat
from atomlab.envs import Task
from atomlab.envs.rollout import Rollout, SampledReply, engine_responder, run_tasks
from atomlab.errors import AtomlabError
from atomlab.infer.engine import Engine
from atomlab.model import Transformer
from atomlab.posttrain.tasks import (
    check_difficulty,
    environments,
    held_out_accuracy,
    held_out_hashes,
    run_chat_format,
    starting_model,
    tokenizer_file,
    training_tasks,
    write_trained_prompts,
)
from atomlab.recipe import Recipe, RLConfig
from atomlab.steps import StepContext
from atomlab.tokenizer import load_tokenizer
from atomlab.train.distributed import World, all_gather_rows, all_reduce_max, all_reduce_sum, current_world
from atomlab.train.loop import Objective, Run, fit, model_args_from_folder
from atomlab.train.parallel import gather_into


def group_advantages(rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per reply: (reward - group mean) / group std; and which groups carry signal (std > 0).
    `rewards` has one row per task and one column per sample."""
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    useful = std[:, 0] > 1e-6
    advantages = np.where(std > 1e-6, (rewards - mean) / np.maximum(std, 1e-6), 0.0)
    return advantages, useful


def token_logprobs(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each target token under the model's distribution at `temperature` (the one sampled from)."""
    logits = model(inputs).float() / temperature
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def rollout_rows(rollout: Rollout, seq_len: int) -> list[tuple[list[int], list[bool]]]:
    """One training row per assistant turn: the prompt's ids and the sampled ids, the mask on the sampled
    ones; cut to the model's context (seq_len + 1 tokens: inputs and shifted targets)."""
    rows = []
    for reply in rollout.replies:
        if not isinstance(reply, SampledReply):
            raise AtomlabError("rl: GRPO trains on sampled token ids; the rollouts must come from the engine")
        ids = [*reply.prompt_ids, *reply.token_ids][: seq_len + 1]
        mask = ([False] * len(reply.prompt_ids) + [True] * len(reply.token_ids))[: seq_len + 1]
        rows.append((ids, mask))
    return rows


def pad_rows(rows: list[tuple[list[int], list[bool]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows right-padded to the longest: (inputs, targets, mask of the targets to train)."""
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    trained = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (ids, mask) in enumerate(rows):
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


MICRO_BATCH = 32  # rows per forward/backward: bounds the update's memory whatever the batch


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


class GRPO(Objective):
    """One GRPO step: the step's tasks rolled out (each process its share), rewards gathered, advantages
    per group, then the clipped surrogate on the sampled tokens, `updates_per_batch` times."""

    def __init__(self, recipe: Recipe, chat_format: ChatFormat) -> None:
        self.config: RLConfig = recipe.rl
        self.seed = recipe.seed
        self.chat_format = chat_format
        self.pad = chat_format.pad_token_id
        self.updates_per_step = self.config.updates_per_batch
        self.envs = environments(self.config.environments, "rl.environments")
        self.loaded = {env.id: env for env in self.envs}
        for env in self.envs:
            check_difficulty(env, min(self.config.difficulty, env.levels), "rl.difficulty")
        self.held_out = held_out_hashes(recipe.evaluate, recipe.seed) if recipe.evaluate.environments else set()
        self.curriculum = Curriculum(self.config.difficulty, self.config.max_difficulty, self.config.promote_at)
        self.positions: dict[str, int] = {}  # "env/level" -> the index of its next training task
        self.streams: dict[str, Any] = {}
        self.trained_prompts: set[str] = set()
        self.rollout_tokens = self.rollout_seconds = 0.0

    def setup(self, model: Transformer, tokenizer: Any, device: torch.device, world: World, seed: int) -> None:
        if self.config.batch_size % world.size:
            raise AtomlabError(
                f"rl.batch_size ({self.config.batch_size}) tasks must be divisible by the {world.size} processes"
            )
        # one engine for the whole run on the plain model: it follows the policy's weights as the optimizer changes
        # them (under a sharded layout the trained model is a sharded twin, whose full weights are copied into
        # the plain one before each rollout: rollouts differ between processes, a sharded forward cannot);
        # prompts in the model's chat template, replies ending at its stop tokens
        self.engine = Engine(model, tokenizer, device, self.chat_format)
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if self.config.kl_coef > 0 else None

    def describe(self) -> str:
        names = ", ".join(env.id for env in self.envs)
        return f"GRPO on {names}: {self.config.batch_size} tasks x {self.config.group_size} replies per step"

    def next_tasks(self, count: int) -> list[Task]:
        tasks = []
        for i in range(count):
            env = self.envs[i % len(self.envs)]
            level = min(self.curriculum.level, env.levels)
            key = f"{env.id}/{level}"
            if key not in self.streams:  # each level has its own index stream
                self.streams[key] = training_tasks(env, self.seed, level, self.held_out, self.positions.get(key, 0))
            task = next(self.streams[key])
            self.positions[key] = task.index + 1
            tasks.append(task)
        return tasks

    def rollout(self, step: int, run: Run) -> dict[str, Any]:
        config, world = self.config, run.world
        difficulty = self.curriculum.level
        tasks = self.next_tasks(config.batch_size)
        self.trained_prompts.update(task.prompt_hash for task in tasks)
        share = config.batch_size // world.size
        mine = tasks[world.rank * share : (world.rank + 1) * share]

        began = time.perf_counter()
        if run.model is not self.engine.model:
            gather_into(run.model, self.engine.model)
        run.model.eval()
        respond = engine_responder(
            self.engine, config.max_tokens, config.temperature, self.seed * 1_000_003 + step, keyed=True
        )
        with torch.no_grad():
            rollouts = run_tasks(mine, respond, config.group_size, self.loaded)
        run.model.train()
        elapsed = time.perf_counter() - began

        local = torch.tensor([r.reward for r in rollouts], dtype=torch.float64).view(share, config.group_size)
        rewards = all_gather_rows(local.to(run.device)).cpu().numpy()  # every group, on every process
        advantages, useful = group_advantages(rewards)
        mine_advantages, mine_useful = advantages[world.rank * share :], useful[world.rank * share :]
        rows, row_advantages = [], []
        for position, rollout in enumerate(rollouts):
            group, sample = divmod(position, config.group_size)
            if mine_useful[group]:
                found = rollout_rows(rollout, run.model.args.seq_len)
                rows += found
                row_advantages += [float(mine_advantages[group, sample])] * len(found)
        sampled = sum(len(reply.token_ids) for r in rollouts for reply in r.replies)
        trained = sum(sum(mask[1:]) for _, mask in rows)
        row_tokens = sum(len(ids) - 1 for ids, _ in rows)
        sampled, trained, row_tokens, seconds = all_reduce_sum([sampled, trained, row_tokens, elapsed], run.device)
        self.rollout_tokens += sampled
        self.rollout_seconds += seconds / world.size
        accuracy = float((rewards >= 1.0).mean())
        if self.curriculum.record(accuracy) and world.is_main:
            print(f"step {step + 1}: accuracy {accuracy:.2f}, difficulty up to {self.curriculum.level}")
        return {
            "rows": rows,
            "advantages": row_advantages,
            "trained_tokens": trained,
            "micro_batches": all_reduce_max(math.ceil(len(rows) / MICRO_BATCH), run.device),
            "old": {},
            "reference": {},
            "record": {
                "difficulty": difficulty,
                "reward": round(float(rewards.mean()), 4),
                "accuracy": round(accuracy, 4),
                "response_tokens": round(sampled / rewards.size, 2),
                "useful_groups": int(useful.sum()),
                "rollout_tokens_per_s": round(sampled / max(seconds / world.size, 1e-9), 1),
                "tokens": int(row_tokens),
            },
        }

    def backward(self, step: int, update: int, run: Run) -> dict[str, Any]:
        if update == 0:
            self.batch = self.rollout(step, run)
        batch, config, world = self.batch, self.config, run.world
        record = dict(batch["record"])
        if batch["micro_batches"] == 0:  # no group anywhere carries signal: no update at all
            return {"loss": 0.0, **record}
        total_tokens = torch.tensor(max(batch["trained_tokens"], 1.0), device=run.device)
        rows, advantages = batch["rows"], batch["advantages"]
        loss_sum = kl = clipped = 0.0
        for index in range(batch["micro_batches"]):
            chunk = slice(index * MICRO_BATCH, (index + 1) * MICRO_BATCH)
            part_rows, weight = rows[chunk], 1.0
            if not part_rows:  # this process has run out of rows: a weightless one keeps it in step
                part_rows, weight = [([self.pad, self.pad], [False, False])], 0.0
            inputs, targets, mask = (t.to(run.device) for t in pad_rows(part_rows, self.pad))
            advantage = torch.tensor(advantages[chunk] or [0.0], device=run.device)[:, None]
            if index not in batch["reference"] and self.reference is not None:
                with torch.no_grad(), run.autocast:
                    batch["reference"][index] = token_logprobs(self.reference, inputs, targets, config.temperature)
            last = index == batch["micro_batches"] - 1
            context = run.net.no_sync() if not last and hasattr(run.net, "no_sync") else nullcontext()
            with context:
                with run.autocast:
                    new = token_logprobs(run.net, inputs, targets, config.temperature)
                old = batch["old"].setdefault(index, new.detach())  # log-probs before this step's first update
                loss, part = grpo_loss(
                    new,
                    old,
                    batch["reference"].get(index),
                    advantage,
                    mask if weight else torch.zeros_like(mask),
                    config.clip_ratio,
                    config.kl_coef,
                    total_tokens,
                )
                # DDP and FSDP average gradients over processes; the loss is already a share of the global mean
                (loss * world.size).backward()
            loss_sum += float(loss.detach())
            kl += part["kl"]
            clipped += part["clipped_fraction"]
        loss_sum, kl, clipped = all_reduce_sum([loss_sum, kl, clipped], run.device)
        return {"loss": loss_sum, **record, "kl": round(kl, 6), "clipped_fraction": round(clipped, 6)}

    def state(self) -> dict[str, Any]:
        return {
            "curriculum": {"level": self.curriculum.level, "recent": self.curriculum.recent},
            "positions": self.positions,
            "trained_prompts": sorted(self.trained_prompts),
            "rollout_tokens": self.rollout_tokens,
            "rollout_seconds": self.rollout_seconds,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.curriculum.level = state["curriculum"]["level"]
        self.curriculum.recent = list(state["curriculum"]["recent"])
        self.positions = dict(state["positions"])
        self.streams = {}
        self.trained_prompts = set(state["trained_prompts"])
        self.rollout_tokens, self.rollout_seconds = state["rollout_tokens"], state["rollout_seconds"]

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        config = self.config
        return {
            "rollouts": config.max_steps * config.batch_size * config.group_size,
            "first_accuracy": records[0]["accuracy"] if records else None,
            "final_accuracy": round(float(np.mean([r["accuracy"] for r in records[-5:]])), 4) if records else None,
            "final_difficulty": self.curriculum.level,
            "skipped_groups": int(sum(config.batch_size - r["useful_groups"] for r in records)),
            "rollout_tokens_per_s": round(self.rollout_tokens / max(self.rollout_seconds, 1e-9), 1),
            "chat_format": self.chat_format.describe(),
        }


def rl(ctx: StepContext, recipe: Recipe) -> dict[str, Any]:
    start = starting_model(ctx)
    tokenizer = load_tokenizer(tokenizer_file(ctx))
    objective = GRPO(recipe, run_chat_format(ctx, tokenizer))
    held_out = held_out_accuracy(ctx, recipe.evaluate, recipe.rl, recipe.seed, tokenizer)
    args, weights = model_args_from_folder(start), start / "model.safetensors"
    summary = fit(ctx, "rl", args, recipe.rl, tokenizer, objective, weights, held_out)
    if current_world().is_main:
        write_trained_prompts(ctx.folder, objective.trained_prompts)
    return summary
