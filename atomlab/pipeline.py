"""From a recipe to its graph of steps: which slice of the recipe each step depends on."""

from __future__ import annotations

from pathlib import Path

from atomlab.errors import AtomlabError
from atomlab.recipe import Recipe, Section
from atomlab.steps import MANIFEST, Step, load_manifest

STEP_NAMES = ("prepare-data", "tokenizer", "pretrain", "sft", "rl", "evaluate", "release")


def build_steps(recipe: Recipe, base: Path | None = None) -> list[Step]:
    """The steps in dependency order. Each step's hash covers exactly the settings it reads."""
    from atomlab.data.prepare import prepare_data, source_fingerprint, tokenize
    from atomlab.evaluate.step import evaluate_step
    from atomlab.release.bundle import release
    from atomlab.train.loop import pretrain

    base = base or Path.cwd()
    data_config = {
        # how many workers, and where, decide the speed of prepare-data but never its bytes
        "data": recipe.data.model_dump(exclude=set(recipe.data.RUNTIME)),
        "seed": recipe.seed,
        "source_content": source_fingerprint(recipe.data, base),
    }
    # resumable: a rerun with --resume reuses the finished tasks of an interrupted prepare-data
    if recipe.data.decontaminate_environments:  # held-out tasks are kept out of the training text
        data_config["evaluate_environments"] = recipe.evaluate.model_dump(
            include={"environments", "tasks", "difficulty"}
        )
    if recipe.data.decontaminate:
        data_config["decontaminate_content"] = file_hashes(recipe.data.decontaminate, base)
    prepare = Step(
        "prepare-data",
        data_config,
        [],
        lambda ctx: prepare_data(ctx, recipe.data, base, recipe.evaluate),
        resumable=True,
    )
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
        identity=hashed(train_config, train=recipe.train),
    )
    # post-training reads the held-out questions to keep them out of its training data
    held_out = {"evaluate_environments": recipe.evaluate.model_dump(include={"environments", "tasks", "difficulty"})}
    trained = [pretrain_step]
    if recipe.sft is not None:
        from atomlab.posttrain.sft import sft

        sft_config = {
            "sft": recipe.sft.model_dump(),
            "seed": recipe.seed,
            **held_out,
            "data_content": sft_fingerprint(recipe, base),
        }
        sft_step = Step(
            "sft",
            sft_config,
            [tokenizer, trained[-1]],
            lambda ctx: sft(ctx, recipe, base),
            resumable=True,
            collective=True,
            identity=hashed(sft_config, sft=recipe.sft),
        )
        trained.append(sft_step)
    if recipe.rl is not None:
        from atomlab.posttrain.rl import rl

        rl_config = {"rl": recipe.rl.model_dump(), "seed": recipe.seed, **held_out}
        rl_step = Step(
            "rl",
            rl_config,
            [tokenizer, trained[-1]],
            lambda ctx: rl(ctx, recipe),
            identity=hashed(rl_config, rl=recipe.rl),
        )
        trained.append(rl_step)
    evaluate = Step(
        "evaluate",
        {"evaluate": recipe.evaluate.model_dump(), "seed": recipe.seed},
        [prepare, tokenizer, *trained],
        lambda ctx: evaluate_step(ctx, recipe),
    )
    release_config = {"release": recipe.release.model_dump(), "recipe": recipe.to_dict()}
    release_step = Step(
        "release",
        release_config,
        [prepare, tokenizer, *trained, evaluate],
        lambda ctx: release(ctx, recipe),
        identity={**release_config, "recipe": recipe.identity()},
    )
    return [prepare, tokenizer, *trained, evaluate, release_step]


def hashed(config: dict, **sections: Section) -> dict:
    """A step's config as its hash sees it: these recipe sections less their NOT_HASHED settings."""
    return {**config, **{key: section.identity() for key, section in sections.items()}}


def recipe_as_run(recipe: Recipe, inputs: dict[str, Path]) -> dict:
    """The recipe with each section as the step that used it ran it (from its manifest). A reused step
    may have run with other NOT_HASHED settings (say checkpoint_every) than this recipe's; a release
    records the ones that made its files, so that re-deriving it from its recipe.toml gives the same."""
    tree = recipe.to_dict()
    for folder in inputs.values():
        if (folder / MANIFEST).is_file():
            ran = load_manifest(folder)["config"]
            tree.update({key: ran[key] for key in tree if isinstance(tree[key], dict) and key in ran})
    return tree


def file_hashes(files: list[str], base: Path) -> dict[str, str]:
    """Content hashes of small files a step reads (SFT data, evaluation data), so editing one reruns it."""
    from atomlab.steps import sha256_file

    found = {}
    for name in files:
        path = Path(name) if Path(name).is_absolute() else base / name
        found[name] = sha256_file(path) if path.is_file() else "missing"
    return found


def sft_fingerprint(recipe: Recipe, base: Path) -> dict[str, str]:
    """Content hashes of the user's SFT files, so editing one reruns the step."""
    return file_hashes(recipe.sft.data if recipe.sft else [], base)


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
