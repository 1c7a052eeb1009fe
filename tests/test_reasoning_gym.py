"""The reasoning-gym adapter: deterministic tasks, strict scoring; skipped when the extra is not installed."""

from __future__ import annotations

import builtins

import pytest

from atomlab.envs import load_environment
from atomlab.envs.base import FORMAT_HINT
from atomlab.errors import AtomlabError


def test_missing_package_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def without_reasoning_gym(name, *args, **kwargs):
        if name == "reasoning_gym" or name.startswith("reasoning_gym."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_reasoning_gym)
    with pytest.raises(AtomlabError, match=r"pip install 'atomlab\[reasoning-gym\]'"):
        load_environment("reasoning-gym:basic_arithmetic")


def test_tasks_are_deterministic_and_strictly_verified():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    env = load_environment("reasoning-gym:basic_arithmetic")
    assert env.id == "reasoning-gym:basic_arithmetic-v1" and env.levels > 1
    task = env.task(seed=3, index=4, difficulty=2)
    assert task == load_environment("reasoning-gym:basic_arithmetic-v1").task(3, 4, 2)  # fresh instance, same task
    assert task.messages[0]["content"].endswith(FORMAT_HINT)
    assert task.data["reasoning_gym_version"] == reasoning_gym.__version__
    assert env.task(3, 5, 2).messages != task.messages
    assert env.verify(task, task.solution).reward == 1.0
    assert env.verify(task, f"<think>sum it up</think><answer> {task.answer} </answer>").reward == 1.0
    # reasoning-gym's own score gives partial credit when the answer sits inside a longer one; here it is 0.
    dataset = env._dataset(task.seed, task.index + 1, task.difficulty)
    padded = f"{task.answer} exactly"
    assert 0 < dataset.score_answer(padded, task.data["entry"]) < 1
    verdict = env.verify(task, f"<answer>{padded}</answer>")
    assert verdict.reward == 0.0 and "reasoning-gym would give" in verdict.reason
    assert env.verify(task, task.answer).reward == 0.0  # no <answer> block


def test_levels_and_unknown_names():
    pytest.importorskip("reasoning_gym")
    env = load_environment("reasoning-gym:leg_counting")
    easy, hard = env.task(0, 0, 1), env.task(0, 0, env.levels)
    assert easy.messages != hard.messages and easy.difficulty == 1
    with pytest.raises(ValueError, match="difficulty"):
        env.task(0, 0, env.levels + 1)
    with pytest.raises(AtomlabError, match="did you mean leg_counting"):
        load_environment("reasoning-gym:leg_countin")
