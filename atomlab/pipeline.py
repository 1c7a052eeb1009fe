"""From a recipe to its graph of steps: which slice of the recipe each step depends on."""

from __future__ import annotations

from pathlib import Path

from atomlab.recipe import Recipe
from atomlab.steps import Step

STEP_NAMES = ("prepare-data", "tokenizer", "pretrain", "evaluate", "release")


def build_steps(recipe: Recipe, base: Path | None = None) -> list[Step]:
    """The steps in dependency order. Each step's hash covers exactly the settings it reads."""
    from atomlab.data.prepare import prepare_data, source_fingerprint, tokenize
    from atomlab.evaluate.step import evaluate_step
    from atomlab.release.bundle import release
    from atomlab.train.loop import pretrain

    base = base or Path.cwd()
    data_config = {
        "data": recipe.data.model_dump(),
        "seed": recipe.seed,
        "source_content": source_fingerprint(recipe.data, base),
    }
    prepare = Step("prepare-data", data_config, [], lambda ctx: prepare_data(ctx, recipe.data, base))
    tokenizer = Step(
        "tokenizer",
        {"tokenizer": recipe.tokenizer.model_dump()},
        [prepare],
        lambda ctx: tokenize(ctx, recipe.tokenizer),
    )
    train_config = {
        "model": recipe.model.model_dump(),
        "train": recipe.train.model_dump(),
        "seed": recipe.seed,
        "sample_prompt": recipe.release.sample_prompt,
    }
    pretrain_step = Step(
        "pretrain",
        train_config,
        [tokenizer],
        lambda ctx: pretrain(ctx, recipe.model, recipe.train, recipe.release.sample_prompt),
        resumable=True,
        collective=True,
    )
    evaluate = Step(
        "evaluate",
        {"evaluate": recipe.evaluate.model_dump(), "seed": recipe.seed},
        [prepare, tokenizer, pretrain_step],
        lambda ctx: evaluate_step(ctx, recipe),
    )
    release_step = Step(
        "release",
        {"release": recipe.release.model_dump(), "recipe": recipe.to_dict()},
        [prepare, tokenizer, pretrain_step, evaluate],
        lambda ctx: release(ctx, recipe),
    )
    return [prepare, tokenizer, pretrain_step, evaluate, release_step]


def select(steps: list[Step], until: str | None) -> list[Step]:
    """The steps needed to produce `until` (all when None)."""
    if until is None:
        return steps
    names = {until}
    for step in reversed(steps):
        if step.name in names:
            names.update(s.name for s in step.inputs)
    return [s for s in steps if s.name in names]
