"""A step's hash covers the code that runs and the settings that change results, and nothing else."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import atomlab
from atomlab.pipeline import recipe_as_run
from atomlab.recipe import TrainConfig, load_recipe
from atomlab.steps import major_version, package_digest
from tests.conftest import step_folder

STEPS = ("prepare-data", "tokenizer", "pretrain", "evaluate", "release")


def dry_run(work: Path, *overrides: str, pythonpath: Path | None = None) -> dict[str, str]:
    """Each step's planned status ('reuse' or 'run') for the smoke recipe in work."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else None
    result = subprocess.run(
        [sys.executable, "-m", "atomlab.cli", "run", "smoke", *overrides, "--dry-run"],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("  ")]
    return {words[0]: words[1] for words in lines}


def test_settings_that_change_nothing_reuse_every_step(smoke_run):
    quiet = [
        "train.tensorboard=true",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=5",
        "train.threads=1",
        "train.async_checkpoint=true",
    ]
    assert dry_run(smoke_run, *quiet) == dict.fromkeys(STEPS, "reuse")
    assert TrainConfig.NOT_HASHED == {
        "tensorboard",
        "wandb",
        "checkpoint_every",
        "keep_checkpoints",
        "threads",
        "async_checkpoint",
    }
    logged = dry_run(smoke_run, "train.eval_every=3")  # the released training log would differ: hashed
    assert logged["tokenizer"] == "reuse" and logged["pretrain"] == "run"


def test_a_reused_step_keeps_the_settings_it_ran_with_in_the_released_recipe(smoke_run):
    recipe = load_recipe("smoke", ["train.checkpoint_every=3", "train.tensorboard=true"])
    inputs = {step: step_folder(smoke_run, step) for step in STEPS[:4]}
    tree = recipe_as_run(recipe, inputs)
    assert tree["train"]["checkpoint_every"] == 10 and tree["train"]["tensorboard"] is False  # as pretrain ran
    assert tree["train"]["max_steps"] == recipe.train.max_steps


def test_editing_a_source_file_reruns_every_step(smoke_run, tmp_path):
    package = Path(atomlab.__file__).parent
    copy = tmp_path / "site" / "atomlab"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert package_digest(copy) == package_digest(package)  # where the code lies does not matter
    assert dry_run(smoke_run, pythonpath=copy.parent) == dict.fromkeys(STEPS, "reuse")
    with open(copy / "model.py", "a") as handle:
        handle.write("# an edit\n")
    assert package_digest(copy) != package_digest(package)
    assert dry_run(smoke_run, pythonpath=copy.parent) == dict.fromkeys(STEPS, "run")


def test_major_versions():
    assert major_version("2.13.0+cpu") == "2" and major_version("0.23.3") == "0.23" and major_version("1.0") == "1"
