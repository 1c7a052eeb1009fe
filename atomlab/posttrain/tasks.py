"""Which environment tasks train a model and which judge it, disjoint by construction.

Training tasks come from the even seed 2*s of the recipe's seed s, held-out tasks from the odd
seed 2*s+1, so no seed is shared. Different seeds can still produce the same question (there
are only so many 2-digit sums), so training also skips every task whose prompt hash is one of
the held-out prompts, and the evaluate step checks the hashes the training steps recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from atomlab.chat_format import ChatFormat
from atomlab.envs import Environment, Task, load_environment
from atomlab.errors import AtomlabError
from atomlab.recipe import EvaluateConfig, TrainConfig
from atomlab.steps import StepContext

TRAINED_PROMPTS = "trained_prompts.txt"  # prompt hashes a training step trained on, one per line


def training_seed(seed: int) -> int:
    return 2 * seed


def held_out_seed(seed: int) -> int:
    return 2 * seed + 1


def environments(names: list[str], field: str) -> list[Environment]:
    try:
        return [load_environment(name) for name in names]
    except AtomlabError as exc:
        raise AtomlabError(f"{field}: {exc}") from None


def check_difficulty(env: Environment, difficulty: int, field: str) -> None:
    if difficulty > env.levels:
        raise AtomlabError(f"{field}: {env.id} has difficulty levels 1..{env.levels}, got {difficulty}")


def held_out_tasks(evaluate: EvaluateConfig, seed: int) -> list[Task]:
    """The evaluation tasks of a run: `evaluate.tasks` per environment, from the held-out seed."""
    tasks = []
    for env in environments(evaluate.environments, "evaluate.environments"):
        difficulty = min(evaluate.difficulty, env.levels)
        tasks += env.tasks(held_out_seed(seed), evaluate.tasks, difficulty)
    return tasks


def held_out_hashes(evaluate: EvaluateConfig, seed: int) -> set[str]:
    return {task.prompt_hash for task in held_out_tasks(evaluate, seed)}


def training_tasks(env: Environment, seed: int, difficulty: int, exclude: set[str], start: int = 0) -> Iterator[Task]:
    """Training tasks of env in index order from `start`, skipping held-out questions."""
    check_difficulty(env, difficulty, "difficulty")
    index = start
    while True:
        task = env.task(training_seed(seed), index, difficulty)
        index += 1
        if task.prompt_hash not in exclude:
            yield task


def write_trained_prompts(folder: Path, hashes: set[str]) -> None:
    (folder / TRAINED_PROMPTS).write_text("".join(f"{h}\n" for h in sorted(hashes)), encoding="utf-8")


def read_trained_prompts(folder: Path) -> set[str]:
    path = folder / TRAINED_PROMPTS
    return set(path.read_text(encoding="utf-8").split()) if path.exists() else set()


TRAINED_STAGES = ("init", "pretrain", "sft", "dpo", "rl")  # steps whose folder holds a model, in graph order


def starting_model(ctx: StepContext) -> Path:
    """The folder of the model a post-training step starts from: its input that holds a model."""
    return next(ctx.inputs[name] for name in reversed(TRAINED_STAGES) if name in ctx.inputs)


def tokenizer_file(ctx: StepContext) -> Path:
    """The run's tokenizer.json: the tokenizer step's, or the imported model's when the recipe starts from one."""
    folder = ctx.inputs["tokenizer"] if "tokenizer" in ctx.inputs else ctx.inputs["init"]
    return folder / "tokenizer.json"


def run_chat_format(ctx: StepContext, tokenizer: Tokenizer) -> ChatFormat:
    """The chat format every post-training step and the evaluation use: an imported model's own (its chat
    template, special tokens and eos ids, which the init step keeps), else atomlab's."""
    if "init" in ctx.inputs:
        return ChatFormat.from_folder(ctx.inputs["init"], tokenizer)
    return ChatFormat.for_tokenizer(tokenizer)


def held_out_accuracy(
    ctx: StepContext, evaluate: EvaluateConfig, section: TrainConfig, seed: int, tokenizer: Tokenizer
) -> Any:
    """What the training loop measures at each validation when `section.eval_environments` is set (else None):
    greedy pass@1 on the first eval_env_tasks of the evaluate step's held-out tasks, in the run's chat format."""
    if not section.eval_environments:
        return None
    from atomlab.evaluate.environments import HeldOutAccuracy

    settings = evaluate.model_copy(update={"environments": section.eval_environments, "tasks": section.eval_env_tasks})
    return HeldOutAccuracy(held_out_tasks(settings, seed), run_chat_format(ctx, tokenizer), evaluate.max_tokens, seed)
