"""The dpo step: Direct Preference Optimization (Rafailov et al., 2023) as an objective of the one
training loop (atomlab.train.loop.fit): checkpoints with exact resume, DDP/FSDP2, autocast.

A preference pair is a prompt with a chosen and a rejected reply. Pairs come from JSONL files
(`{"prompt": "..." or "messages": [...], "chosen": "...", "rejected": "..."}` per line) and from
environment rollouts of the starting model: for each training task, `dpo.samples` replies are
sampled with the engine, and a verified reply is paired against a failed one of the same task
(trained on the token ids the engine sampled). The loss of a pair is
-log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))),
with `ref` the frozen starting model and log-probabilities summed over the reply's tokens; its
implicit rewards beta * (log pi - log ref) give the reported margins and accuracy. Every 10th pair
validates (when there are at least 10).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from atomlab.chat_format import ChatFormat
from atomlab.envs.base import prompt_hash
from atomlab.envs.rollout import SampledReply, engine_responder, run_tasks
from atomlab.errors import AtomlabError
from atomlab.infer.engine import Engine
from atomlab.model import Transformer
from atomlab.posttrain.rl import pad_rows
from atomlab.posttrain.sft import Sequence, checked_messages, jsonl_records
from atomlab.posttrain.tasks import (
    environments,
    held_out_accuracy,
    held_out_hashes,
    run_chat_format,
    starting_model,
    tokenizer_file,
    training_tasks,
    write_trained_prompts,
)
from atomlab.recipe import DPOConfig, Recipe
from atomlab.steps import StepContext, write_json
from atomlab.tokenizer import load_tokenizer
from atomlab.train.distributed import World, all_gather_objects, all_reduce_sum, current_world
from atomlab.train.loop import Objective, Run, fit, model_args_from_folder


def read_pairs_file(path: Path) -> list[dict[str, Any]]:
    """Preference pairs of a JSONL file as {"messages", "chosen", "rejected"}; AtomlabError naming the line
    of the first malformed one."""
    pairs = []
    for where, record in jsonl_records(path, "dpo.data"):
        if not isinstance(record, dict):
            raise AtomlabError(f'{where}: expected {{"prompt": ..., "chosen": ..., "rejected": ...}}')
        if isinstance(record.get("prompt"), str) and "messages" not in record:
            messages = [{"role": "user", "content": record["prompt"]}]
        elif "messages" in record:
            messages = checked_messages(where, record["messages"])
            if messages[-1]["role"] == "assistant":
                raise AtomlabError(f"{where}: the messages are the prompt; put the replies in chosen and rejected")
        else:
            raise AtomlabError(f'{where}: needs "prompt" (a string) or "messages" (a list of chat messages)')
        for field in ("chosen", "rejected"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise AtomlabError(f"{where}: {field} must be a non-empty string (the assistant's reply)")
        if record["chosen"] == record["rejected"]:
            raise AtomlabError(f"{where}: chosen and rejected are the same reply; the pair teaches nothing")
        pairs.append({"messages": messages, "chosen": record["chosen"], "rejected": record["rejected"]})
    return pairs


def encode_reply(chat_format: ChatFormat, messages: list[dict[str, str]], reply: str) -> Sequence:
    """The prompt and a reply in the model's chat format; the mask on the reply's tokens through its end of turn."""
    return chat_format.encode([*messages, {"role": "assistant", "content": reply}])


def sampled_sequence(reply: SampledReply) -> Sequence:
    return [*reply.prompt_ids, *reply.token_ids], [False] * len(reply.prompt_ids) + [True] * len(reply.token_ids)


def rollout_pairs(
    recipe: Recipe, engine: Engine, world: World, held_out: set[str]
) -> tuple[list[tuple[Sequence, Sequence]], set[str], dict[str, Any]]:
    """Pairs from the starting model's own replies: per task, the first verified reply against the first
    failed one (tasks whose replies all pass or all fail give none). The tasks are split across processes
    and the pairs gathered, in task order."""
    config: DPOConfig = recipe.dpo
    pairs: list[tuple[Sequence, Sequence]] = []
    prompts: set[str] = set()
    sources = []
    for env in environments(config.environments, "dpo.environments"):
        stream = training_tasks(env, recipe.seed, min(config.difficulty, env.levels), held_out)
        tasks = [next(stream) for _ in range(config.tasks)]
        mine = tasks[world.rank :: world.size]
        respond = engine_responder(engine, config.max_tokens, config.temperature, recipe.seed, keyed=True)
        with torch.no_grad():
            rollouts = run_tasks(mine, respond, config.samples, {env.id: env})
        found = []
        for first in range(0, len(rollouts), config.samples):
            group = rollouts[first : first + config.samples]
            good = [r for r in group if r.reward >= 1.0 and r.turns == 1]
            bad = [r for r in group if r.reward < 1.0 and r.turns == 1]
            if good and bad:
                found.append(
                    (group[0].task.index, sampled_sequence(good[0].replies[0]), sampled_sequence(bad[0].replies[0]))
                )
        gathered = sorted((p for part in all_gather_objects(found) for p in part), key=lambda p: p[0])
        pairs += [(chosen, rejected) for _, chosen, rejected in gathered]
        prompts.update(task.prompt_hash for task in tasks)
        sources.append({"environment": env.id, "tasks": len(tasks), "samples": config.samples, "pairs": len(gathered)})
    return pairs, prompts, {"sources": sources}


def sequence_logprobs(
    net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probability of each row's reply tokens."""
    logits = net(inputs).float()
    token = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return (token * mask).sum(dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the DPO loss, and the implicit rewards beta * (log pi - log ref) of chosen and rejected."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def pad_sequences(sequences: list[Sequence], pad: int, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (inputs, targets, reply mask of the targets as 0/1), each cut to seq_len + 1 tokens."""
    inputs, targets, mask = pad_rows([(ids[: seq_len + 1], mask[: seq_len + 1]) for ids, mask in sequences], pad)
    return inputs, targets, mask.float()


class DPO(Objective):
    """One DPO step: `dpo.batch_size` pairs (each process its share, chosen and rejected in one forward)."""

    def __init__(self, recipe: Recipe, chat_format: ChatFormat, base: Path) -> None:
        self.recipe, self.config, self.chat_format = recipe, recipe.dpo, chat_format
        self.pad = chat_format.pad_token_id
        self.held_out = held_out_hashes(recipe.evaluate, recipe.seed) if recipe.evaluate.environments else set()
        self.file_pairs: list[tuple[Sequence, Sequence]] = []
        self.trained_prompts: set[str] = set()
        self.sources: list[dict[str, Any]] = []
        for name in self.config.data:
            path = Path(name) if Path(name).is_absolute() else base / name
            pairs = read_pairs_file(path)
            kept = [p for p in pairs if prompt_hash(p["messages"]) not in self.held_out]
            self.trained_prompts.update(prompt_hash(p["messages"]) for p in kept)
            self.file_pairs += [
                (
                    encode_reply(chat_format, p["messages"], p["chosen"]),
                    encode_reply(chat_format, p["messages"], p["rejected"]),
                )
                for p in kept
            ]
            self.sources.append({"file": str(path), "pairs": len(pairs), "held_out_removed": len(pairs) - len(kept)})

    def setup(self, model: Transformer, tokenizer: Any, device: torch.device, world: World, seed: int) -> None:
        pairs = list(self.file_pairs)
        if self.config.environments:
            model.eval()
            engine = Engine(model, tokenizer, device, self.chat_format)  # prompts in its template, stops at its eos
            made, prompts, info = rollout_pairs(self.recipe, engine, world, self.held_out)
            model.train()
            pairs += made
            self.trained_prompts |= prompts
            self.sources += info["sources"]
        if not pairs:
            raise AtomlabError(
                "dpo: no preference pairs; set dpo.data to JSONL files, or dpo.environments (pairs need tasks where "
                "the starting model's replies both pass and fail: raise dpo.samples or dpo.tasks)"
            )
        self.val = pairs[9::10] if len(pairs) >= 10 else []
        self.train = [p for i, p in enumerate(pairs) if len(pairs) < 10 or i % 10 != 9]
        self.reference = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.seq_len = model.args.seq_len

    def describe(self) -> str:
        return f"DPO (beta {self.config.beta}) on {len(self.train):,} preference pairs, {len(self.val):,} validating"

    def order(self, i: int) -> int:
        """Pair i of the run: a seeded permutation per epoch, as Rows orders rows."""
        epoch, position = divmod(i, len(self.train))
        if epoch != getattr(self, "_epoch", -1):
            generator = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(len(self.train), generator=generator).tolist(), epoch
        return self._order[position]

    def forward(self, run: Run, pairs: list[tuple[Sequence, Sequence]]) -> tuple[torch.Tensor, ...]:
        """Losses and implicit rewards of pairs, chosen and rejected in one batch."""
        inputs, targets, mask = (
            t.to(run.device)
            for t in pad_sequences([p[0] for p in pairs] + [p[1] for p in pairs], self.pad, self.seq_len)
        )
        with torch.no_grad(), run.autocast:
            reference = sequence_logprobs(self.reference, inputs, targets, mask)
        with run.autocast:
            policy = sequence_logprobs(run.net, inputs, targets, mask)
        count = len(pairs)
        return dpo_loss(policy[:count], policy[count:], reference[:count], reference[count:], self.config.beta)

    def backward(self, step: int, update: int, run: Run) -> dict[str, Any]:
        local = self.config.batch_size // run.world.size
        first = step * self.config.batch_size + run.world.rank * local
        pairs = [self.train[self.order(first + j)] for j in range(local)]
        losses, chosen, rejected = self.forward(run, pairs)
        loss = losses.sum() / self.config.batch_size
        (loss * run.world.size).backward()  # DDP/FSDP average over processes; loss is a share of the global mean
        margins = chosen - rejected
        total, margin, correct, chosen_sum, tokens = all_reduce_sum(
            [
                float(loss.detach()),
                float(margins.sum()),
                float((margins > 0).sum()),
                float(chosen.sum()),
                float(sum(len(a[0]) + len(b[0]) for a, b in pairs)),
            ],
            run.device,
        )
        count = self.config.batch_size
        return {
            "loss": total,
            "tokens": int(tokens),
            "reward_margin": round(margin / count, 5),
            "reward_accuracy": round(correct / count, 4),
            "chosen_reward": round(chosen_sum / count, 5),
        }

    @torch.no_grad()
    def validate(self, run: Run, final: bool) -> dict[str, Any]:
        if not self.val:
            return {}
        world, local = run.world, max(1, self.config.batch_size // run.world.size)
        mine = self.val[world.rank :: world.size]
        per_process = math.ceil(len(self.val) / world.size)
        loss = margin = correct = 0.0
        run.net.eval()
        for start in range(0, per_process, local):  # the same number of forwards on every process
            chunk, weight = mine[start : start + local], 1.0
            if not chunk:
                chunk, weight = self.val[:1], 0.0
            losses, chosen, rejected = self.forward(run, chunk)
            loss += weight * float(losses.sum())
            margin += weight * float((chosen - rejected).sum())
            correct += weight * float((chosen > rejected).sum())
        run.net.train()
        loss, margin, correct = all_reduce_sum([loss, margin, correct], run.device)
        count = len(self.val)
        return {
            "val_loss": loss / count,
            "val_reward_margin": round(margin / count, 5),
            "val_reward_accuracy": round(correct / count, 4),
        }

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        last = next((r for r in reversed(records) if "val_loss" in r), {})
        return {
            "train_pairs": len(self.train),
            "val_pairs": len(self.val),
            "beta": self.config.beta,
            "final_reward_accuracy": round(float(np.mean([r["reward_accuracy"] for r in records[-10:]])), 4)
            if records
            else None,
            "val_reward_accuracy": last.get("val_reward_accuracy"),
            "val_reward_margin": last.get("val_reward_margin"),
            "sources": self.sources,
            "chat_format": self.chat_format.describe(),
        }


def dpo(ctx: StepContext, recipe: Recipe, base: Path) -> dict[str, Any]:
    start = starting_model(ctx)
    tokenizer = load_tokenizer(tokenizer_file(ctx))
    objective = DPO(recipe, run_chat_format(ctx, tokenizer), base)
    held_out = held_out_accuracy(ctx, recipe.evaluate, recipe.dpo, recipe.seed, tokenizer)
    args, weights = model_args_from_folder(start), start / "model.safetensors"
    summary = fit(ctx, "dpo", args, recipe.dpo, tokenizer, objective, weights, held_out)
    if current_world().is_main:
        write_trained_prompts(ctx.folder, objective.trained_prompts)
        write_json(ctx.folder / "dpo_data.json", {"sources": objective.sources, "train_pairs": len(objective.train)})
    return {k: v for k, v in summary.items() if k != "sources"}
