from pathlib import Path

import pytest

from atomlab.errors import AtomlabError
from atomlab.recipe import load_recipe
from tests.conftest import atomlab


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, *overrides: str) -> str:
    with pytest.raises(AtomlabError) as info:
        load_recipe(str(write(tmp_path, text)), overrides)
    return str(info.value)


def test_shipped_recipes_load_by_name_and_path():
    assert load_recipe("tiny").name == "tiny"
    assert load_recipe("smoke").train.max_steps < load_recipe("tiny").train.max_steps
    assert load_recipe("recipes/tiny.toml").model == load_recipe("tiny").model


def test_unknown_key_names_file_and_key(tmp_path):
    message = error_of(tmp_path, "[train]\nlearning_rate = 0.1\n")
    assert message.startswith(str(tmp_path / "r.toml"))
    assert "train.learning_rate" in message and "unknown key" in message


def test_wrong_type(tmp_path):
    message = error_of(tmp_path, '[model]\nn_layers = "four"\n')
    assert "model.n_layers" in message and "'four'" in message


def test_negative_learning_rate(tmp_path):
    message = error_of(tmp_path, "[train]\nlr = -1\n")
    assert "train.lr" in message and "greater than 0" in message and "-1" in message


def test_heads_must_divide_width(tmp_path):
    message = error_of(tmp_path, "[model]\nd_model = 100\nn_heads = 3\n")
    assert "model.n_heads (3) must divide model.d_model (100)" in message


def test_more_validation_than_data(tmp_path):
    message = error_of(tmp_path, "[data]\nval_fraction = 0.9\n")
    assert "data.val_fraction" in message


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, "[train]\nlr = 0.01\n")
    recipe = load_recipe(str(path), ["train.lr=1e-4", "model.mlp=relu2", "data.sources=['a.txt']"])
    assert recipe.train.lr == 1e-4 and recipe.model.mlp == "relu2" and recipe.data.sources == ["a.txt"]
    assert "model.widht" in error_of(tmp_path, "", "model.widht=3")
    assert "train.warmup_steps" in error_of(tmp_path, "", "train.warmup_steps=5000")


def test_invalid_toml(tmp_path):
    assert "not valid TOML" in error_of(tmp_path, "[train\n")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, "[train]\nlr = -1\n")
    result = atomlab("run", str(path), "--dry-run", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"error: {path}: train.lr")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # stopped before any work


def test_held_out_accuracy_while_training_only_uses_tasks_evaluate_holds_out(tmp_path):
    base = '[evaluate]\nenvironments = ["arithmetic"]\ntasks = 50\n'
    recipe = load_recipe(
        str(write(tmp_path, base + '[sft]\neval_environments = ["arithmetic"]\neval_env_tasks = 50\n'))
    )
    assert recipe.sft.eval_environments == ["arithmetic"] and recipe.sft.eval_env_tasks == 50
    message = error_of(tmp_path, base + '[train]\neval_environments = ["arithmetic", "sorting"]\n')
    assert "train.eval_environments: sorting not in evaluate.environments (['arithmetic'])" in message
    assert "add it there" in message
    message = error_of(tmp_path, base + '[sft]\neval_environments = ["arithmetic"]\neval_env_tasks = 51\n')
    assert "sft.eval_env_tasks (51) is more than evaluate.tasks (50)" in message and "lower it" in message
    # The recipe's own defaults name no environment, so nothing is checked against evaluate.
    assert load_recipe(str(write(tmp_path, "[evaluate]\nenvironments = []\n"))).train.eval_environments == []
