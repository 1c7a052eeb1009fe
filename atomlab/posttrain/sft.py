"""The sft step: the training loop on chat examples, packed into rows, loss on assistant tokens only.

Examples come from environments (their gold replies, or whole gold conversations for multi-turn
environments) and from user JSONL files in the OpenAI `messages` format. Held-out evaluation
questions are removed from both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atomlab.chat_format import ChatFormat
from atomlab.envs import Task
from atomlab.envs.base import prompt_hash
from atomlab.errors import AtomlabError
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
from atomlab.recipe import Recipe
from atomlab.steps import StepContext, write_json
from atomlab.tokenizer import CHAT_ROLES, END_OF_TEXT, load_tokenizer
from atomlab.train.loop import Rows, TrainingData, fit, model_args_from_folder

IGNORE = -100  # target of tokens that carry no loss
Sequence = tuple[list[int], list[bool]]  # token ids and, per token, whether it is a reply token (carries loss)


class PackedChats(Rows):
    """Tokenised conversations packed greedily, in order, into rows of seq_len+1 tokens; a conversation
    never straddles two rows, the rest of a row is padding. Targets are IGNORE outside assistant replies."""

    def __init__(self, examples: list[Sequence], seq_len: int, seed: int, pad_id: int) -> None:
        self.seed, self.seq_len = seed, seq_len
        rows: list[list[Sequence]] = []
        used = seq_len + 2  # forces a new row for the first example
        self.truncated = 0
        for ids, mask in examples:
            if len(ids) > seq_len + 1:  # too long for the context: keep its start
                ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
                self.truncated += 1
            if used + len(ids) > seq_len + 1:
                rows.append([])
                used = 0
            rows[-1].append((ids, mask))
            used += len(ids)
        self.count = len(rows)
        self.tokens = np.full((self.count, seq_len + 1), pad_id, dtype=np.int64)
        self.labels = np.full((self.count, seq_len + 1), IGNORE, dtype=np.int64)
        for row, members in enumerate(rows):
            position = 0
            for ids, mask in members:
                span = slice(position, position + len(ids))
                self.tokens[row, span] = ids
                self.labels[row, span] = np.where(mask, ids, IGNORE)
                position += len(ids)
        self.examples = len(examples)
        self.trained_tokens = int((self.labels[:, 1:] != IGNORE).sum())

    def rows(self, indices: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.tokens[index, :-1]), torch.from_numpy(self.labels[index, 1:])


def jsonl_records(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    """(FILE:LINE, parsed object) of each non-empty line of a JSONL file named by recipe field `field`;
    AtomlabError naming the file (and line) when it is missing, not UTF-8 or not JSON."""
    if not path.is_file():
        raise AtomlabError(f"{field}: {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise AtomlabError(f"{path}: not UTF-8 text; {field} files are JSONL") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise AtomlabError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None


def checked_messages(where: str, messages: Any) -> list[dict[str, str]]:
    """Chat messages with a known role and string content each, copied down to those two keys."""
    if not isinstance(messages, list) or not messages:
        raise AtomlabError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for turn, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise AtomlabError(f"{where}: message {turn}: role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise AtomlabError(f"{where}: message {turn}: content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_messages_file(path: Path) -> list[list[dict[str, str]]]:
    """Conversations of a JSONL file, one {"messages": [...]} per line; AtomlabError naming the line of
    the first malformed one."""
    conversations = []
    for where, record in jsonl_records(path, "sft.data"):
        messages = checked_messages(where, record.get("messages") if isinstance(record, dict) else None)
        if messages[-1]["role"] != "assistant":
            raise AtomlabError(f"{where}: the last message must be the assistant's reply (it is what SFT learns)")
        conversations.append(messages)
    return conversations


def gold_conversation(task: Task) -> list[dict[str, str]]:
    """The task's prompt and its gold reply; multi-turn environments give their whole gold transcript."""
    transcript = task.data.get("gold_transcript")
    if transcript:
        return [dict(m) for m in transcript]
    return [*task.messages, {"role": "assistant", "content": task.solution}]


def first_prompt(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages before the first assistant reply: the question a conversation asks."""
    for position, message in enumerate(conversation):
        if message["role"] == "assistant":
            return conversation[:position]
    return conversation


def sft_conversations(recipe: Recipe, base: Path) -> dict[str, Any]:
    """Training and validation conversations, with the held-out questions removed."""
    config = recipe.sft
    held_out = held_out_hashes(recipe.evaluate, recipe.seed) if recipe.evaluate.environments else set()
    train, val, sources = [], [], []
    for env in environments(config.environments, "sft.environments"):
        stream = training_tasks(env, recipe.seed, min(config.difficulty, env.levels), held_out)
        tasks = [next(stream) for _ in range(config.tasks + config.val_tasks)]
        train += [gold_conversation(t) for t in tasks[: config.tasks]]
        val += [gold_conversation(t) for t in tasks[config.tasks :]]
        sources.append({"environment": env.id, "train": config.tasks, "val": config.val_tasks})
    removed = 0
    for name in config.data:
        path = Path(name) if Path(name).is_absolute() else base / name
        conversations = read_messages_file(path)
        kept = [c for c in conversations if prompt_hash(first_prompt(c)) not in held_out]
        removed += len(conversations) - len(kept)
        # every 20th conversation validates (files of under 20 only train)
        val += kept[19::20]
        train += [c for i, c in enumerate(kept) if i % 20 != 19]
        sources.append({"file": str(path), "conversations": len(conversations), "held_out_removed": removed})
    if not train:
        raise AtomlabError("sft: no training examples; set sft.environments and sft.tasks, or sft.data")
    if not val:
        raise AtomlabError("sft: no validation examples; set sft.val_tasks with an environment, or more sft.data")
    return {"train": train, "val": val, "sources": sources, "held_out_removed": removed}


def example_record(chat_format: ChatFormat, example: Sequence) -> dict[str, str]:
    """A training example as text, control tokens written out: all of it, and the part that carries loss."""
    ids, mask = example
    decode = chat_format.tokenizer.decode
    return {
        "text": decode(ids, skip_special_tokens=False),
        "trained": decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False),
    }


def sft(ctx: StepContext, recipe: Recipe, base: Path) -> dict[str, Any]:
    config = recipe.sft
    start = starting_model(ctx)
    tokenizer = load_tokenizer(tokenizer_file(ctx))
    args = model_args_from_folder(start)
    chats = sft_conversations(recipe, base)
    seed = ctx.seed
    rng = np.random.default_rng(seed)
    chat_format = run_chat_format(ctx, tokenizer)  # an imported model's own template, else atomlab's;
    # the mask of each example covers exactly its assistant replies, each through the token that ends it
    pad = chat_format.pad_token_id
    train_examples = chat_format.encode_many(chats["train"])
    train_examples = [train_examples[i] for i in rng.permutation(len(train_examples))]
    length = min(config.pack_length or args.seq_len, args.seq_len)
    train_rows = PackedChats(train_examples, length, seed, pad)
    val_rows = PackedChats(chat_format.encode_many(chats["val"]), length, seed, pad)
    sample_prompt = chat_format.render(first_prompt(chats["val"][0]), add_generation_prompt=True)
    write_trained_prompts(ctx.folder, {prompt_hash(first_prompt(c)) for c in chats["train"]})
    data_summary = {
        "sources": chats["sources"],
        "train_conversations": len(chats["train"]),
        "val_conversations": len(chats["val"]),
        "held_out_removed": chats["held_out_removed"],
        "train_rows": train_rows.count,
        "train_tokens_with_loss": train_rows.trained_tokens,
        "truncated": train_rows.truncated,
        "chat_format": chat_format.describe(),
        "example": example_record(chat_format, train_examples[0]),
    }
    write_json(ctx.folder / "sft_data.json", data_summary)
    print(
        f"sft: {len(chats['train']):,} conversations packed into {train_rows.count:,} rows of {length} tokens "
        f"({train_rows.trained_tokens:,} assistant tokens), {len(chats['val']):,} for validation "
        f"(chat format: {chat_format.where})"
    )
    data = TrainingData(train_rows, val_rows, sample_prompt, sample_stop=chat_format.reply_end or END_OF_TEXT)
    held_out = held_out_accuracy(ctx, recipe.evaluate, config, recipe.seed, tokenizer)
    summary = fit(ctx, "sft", args, config, tokenizer, data, start / "model.safetensors", held_out)
    return {**summary, "data": {k: v for k, v in data_summary.items() if k not in ("sources", "example")}}
