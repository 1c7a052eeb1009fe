"""From a recipe to its graph of steps: which slice of the recipe each step depends on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError
from atomlab.recipe import Recipe, Section
from atomlab.steps import MANIFEST, Step, StepContext, load_manifest

STEP_NAMES = ("init", "prepare-data", "tokenizer", "pretrain", "sft", "dpo", "rl", "evaluate", "release")


def build_steps(recipe: Recipe, base: Path | None = None) -> list[Step]:
    """The steps in dependency order. Each step's hash covers exactly the settings it reads."""
    from atomlab.data.prepare import prepare_data, source_fingerprint
    from atomlab.data.tokens import tokenize
    from atomlab.evaluate.step import evaluate_step
    from atomlab.release.bundle import release
    from atomlab.train.loop import pretrain

    base = base or Path.cwd()
    # post-training reads the held-out questions to keep them out of its training data
    held_out_settings = {"environments", "tasks", "difficulty", "max_tokens"}
    held_out = {"evaluate_environments": recipe.evaluate.model_dump(include=held_out_settings)}
    if recipe.init is not None:  # start from an existing model: no data, tokenizer or pretraining
        from atomlab.posttrain.init import init_fingerprint, init_model

        init_step = Step(
            "init",
            {"init": recipe.init.model_dump(by_alias=True), "source_content": init_fingerprint(recipe.init, base)},
            [],
            lambda ctx: init_model(ctx, recipe.init, base),
        )
        prepare = tokenizer = None
        trained = [init_step]
    else:
        data_config = {
            # how many workers, and where, decide the speed of prepare-data but never its bytes
            # [[data.mix]] is read by pretraining's loader, not here
            "data": recipe.data.model_dump(exclude=set(recipe.data.RUNTIME) | {"mix"}),
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
            **(held_out if recipe.train.eval_environments else {}),  # the accuracy logged while training
        }
        pretrain_step = Step(
            "pretrain",
            train_config,
            [tokenizer],
            lambda ctx: pretrain(
                ctx,
                recipe.model,
                recipe.train,
                recipe.release.sample_prompt,
                recipe.data.mix,
                recipe.evaluate,
            ),
            resumable=True,
            collective=True,
            identity=hashed(train_config, train=recipe.train),
        )
        trained = [pretrain_step]
    vocabulary = tokenizer or trained[0]  # the tokenizer step's, or the imported model's own

    def post_training(name: str, run: Callable[[StepContext], Any], data: list[str] | None = None) -> Step:
        """A post-training step on the model of the step before it; its hash covers its section, the seed,
        the held-out questions and the content of its data files."""
        config = {name: getattr(recipe, name).model_dump(), "seed": recipe.seed, **held_out}
        if data is not None:
            config["data_content"] = file_hashes(data, base)
        inputs = [trained[-1]] if trained[-1] is vocabulary else [vocabulary, trained[-1]]
        identity = hashed(config, **{name: getattr(recipe, name)})
        return Step(name, config, inputs, run, resumable=True, collective=True, identity=identity)

    if recipe.sft is not None:
        from atomlab.posttrain.sft import sft

        trained.append(post_training("sft", lambda ctx: sft(ctx, recipe, base), recipe.sft.data))
    if recipe.dpo is not None:
        from atomlab.posttrain.dpo import dpo

        trained.append(post_training("dpo", lambda ctx: dpo(ctx, recipe, base), recipe.dpo.data))
    if recipe.rl is not None:
        from atomlab.posttrain.rl import rl

        trained.append(post_training("rl", lambda ctx: rl(ctx, recipe)))
    sources = [step for step in (prepare, tokenizer) if step is not None]
    evaluate = Step(
        "evaluate",
        {"evaluate": recipe.evaluate.model_dump(), "seed": recipe.seed},
        [*sources, *trained],
        lambda ctx: evaluate_step(ctx, recipe),
    )
    release_config = {"release": recipe.release.model_dump(), "recipe": recipe.to_dict()}
    release_step = Step(
        "release",
        release_config,
        [*sources, *trained, evaluate],
        lambda ctx: release(ctx, recipe),
        identity={**release_config, "recipe": recipe.identity()},
    )
    return [*sources, *trained, evaluate, release_step]


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
