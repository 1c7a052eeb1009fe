"""From a recipe to its graph of steps: which slice of the recipe each step depends on."""

from __future__ import annotations

from pathlib import Path

from atomlab.errors import AtomlabError
from atomlab.recipe import Recipe
from atomlab.steps import Step

STEP_NAMES = ("prepare-data", "tokenizer", "pretrain", "sft", "rl", "evaluate", "release")


def build_steps(recipe: Recipe, base: Path | None = None) -> list[Step]:
    """The steps in dependency order. Each step's hash covers exactly the settings it reads."""
    from atomlab.data.prepare import prepare_data, source_fingerprint
    from atomlab.data.tokens import tokenize
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
        {"tokenizer": recipe.tokenizer.model_dump(), "seed": recipe.seed},  # the seed picks the BPE sample
        [prepare],
        lambda ctx: tokenize(ctx, recipe.tokenizer, recipe.data),
    )
    train_config = {
        "model": recipe.model.model_dump(),
        "train": recipe.train.model_dump(),
        "seed": recipe.seed,
        "sample_prompt": recipe.release.sample_prompt,
        "data_mix": [entry.model_dump() for entry in recipe.data.mix],
    }
    pretrain_step = Step(
        "pretrain",
        train_config,
        [tokenizer],
        lambda ctx: pretrain(ctx, recipe.model, recipe.train, recipe.release.sample_prompt, recipe.data.mix),
        resumable=True,
        collective=True,
    )
    # post-training reads the held-out questions to keep them out of its training data
    held_out = {"evaluate_environments": recipe.evaluate.model_dump(include={"environments", "tasks", "difficulty"})}
    trained = [pretrain_step]
    if recipe.sft is not None:
        from atomlab.posttrain.sft import sft

        sft_step = Step(
            "sft",
            {
                "sft": recipe.sft.model_dump(),
                "seed": recipe.seed,
                **held_out,
                "data_content": sft_fingerprint(recipe, base),
            },
            [tokenizer, trained[-1]],
            lambda ctx: sft(ctx, recipe, base),
            resumable=True,
            collective=True,
        )
        trained.append(sft_step)
    if recipe.rl is not None:
        from atomlab.posttrain.rl import rl

        rl_step = Step(
            "rl",
            {"rl": recipe.rl.model_dump(), "seed": recipe.seed, **held_out},
            [tokenizer, trained[-1]],
            lambda ctx: rl(ctx, recipe),
        )
        trained.append(rl_step)
    evaluate = Step(
        "evaluate",
        {"evaluate": recipe.evaluate.model_dump(), "seed": recipe.seed},
        [prepare, tokenizer, *trained],
        lambda ctx: evaluate_step(ctx, recipe),
    )
    release_step = Step(
        "release",
        {"release": recipe.release.model_dump(), "recipe": recipe.to_dict()},
        [prepare, tokenizer, *trained, evaluate],
        lambda ctx: release(ctx, recipe),
    )
    return [prepare, tokenizer, *trained, evaluate, release_step]


def sft_fingerprint(recipe: Recipe, base: Path) -> dict[str, str]:
    """Content hashes of the user's SFT files, so editing one reruns the step."""
    from atomlab.steps import sha256_file

    found = {}
    for name in recipe.sft.data if recipe.sft else []:
        path = Path(name) if Path(name).is_absolute() else base / name
        found[name] = sha256_file(path) if path.is_file() else "missing"
    return found


def select(steps: list[Step], until: str | None) -> list[Step]:
    """The steps needed to produce `until` (all when None)."""
    if until is None:
        return steps
    if until not in {step.name for step in steps}:
        raise AtomlabError(f"this recipe has no {until} step; add a [{until}] section to it (see recipes/tiny.toml)")
    names = {until}
    for step in reversed(steps):
        if step.name in names:
            names.update(s.name for s in step.inputs)
    return [s for s in steps if s.name in names]
