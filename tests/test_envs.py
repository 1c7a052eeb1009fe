"""Environments: every registered one is deterministic, scores its gold replies 1 and near-misses 0.

The generic tests run over `list_environments()`, so environments added later (code, tool use,
plugins installed in the venv) are covered without editing this file. Per-environment near-misses
follow for the built-ins; then entry-point plugins and the `atomlab envs` command.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atomlab.cli import main
from atomlab.envs import Environment, Task, extract_answer, list_environments, load_environment
from atomlab.envs.base import FORMAT_HINT, answer_tag
from atomlab.envs.builtin import ENVIRONMENTS as BUILTIN_CLASSES
from atomlab.envs.builtin import INTEGER

ROOT = Path(__file__).resolve().parent.parent
ENVS = list_environments()
BUILTINS = [env for env in ENVS if type(env) in BUILTIN_CLASSES]
MEGABYTE = 1_000_000


def by_id(envs: list[Environment]) -> dict:
    return {"argvalues": envs, "ids": [env.id for env in envs]}


def levels(env: Environment) -> range:
    return range(1, env.levels + 1)


def sample_tasks(env: Environment, per_level: int, seed: int = 11) -> list[Task]:
    return [task for level in levels(env) for task in env.tasks(seed, per_level, level)]


def garbage_unicode(seed: int, length: int = 300) -> str:
    """Random code points from the whole range: controls, lone surrogates, right-to-left marks, emoji."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x110000)) for _ in range(length))


@pytest.mark.parametrize("env", **by_id(ENVS))
def test_same_seed_same_task_and_different_seeds_differ(env):
    fresh = load_environment(env.id)
    for level in levels(env):
        for index in range(5):
            assert env.task(3, index, level) == fresh.task(3, index, level)
        differ = sum(env.task(1, i, level).prompt_hash != env.task(2, i, level).prompt_hash for i in range(20))
        assert differ > 10, f"{env.id} level {level}: seeds 1 and 2 give the same task for {20 - differ} of 20"


def test_tasks_are_the_same_in_another_process():
    """No hash-ordered sets or global state: fresh interpreters with other hash seeds make the same tasks."""
    script = (
        "from atomlab.envs import list_environments\n"
        "for env in list_environments():\n"
        "    for level in range(1, env.levels + 1):\n"
        "        print(env.id, level, [env.task(5, i, level).prompt_hash for i in range(4)])\n"
    )
    here = "".join(
        f"{env.id} {level} {[env.task(5, i, level).prompt_hash for i in range(4)]}\n"
        for env in ENVS
        for level in levels(env)
    )
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
        assert there.returncode == 0, there.stderr
        assert there.stdout == here


@pytest.mark.parametrize("env", **by_id(ENVS))
def test_gold_reply_scores_one_at_every_level(env):
    for task in sample_tasks(env, 30):
        verdict = env.verify(task, task.solution)
        assert verdict.reward == 1.0, (task.id, task.solution, verdict)
        if env.max_turns == 1:  # a one-turn gold reply is the gold answer in its tag
            assert extract_answer(task.solution)[0] == task.answer.strip(), task.id
        assert json.dumps(task.data, default=str)  # `atomlab envs show --json` prints it


@pytest.mark.parametrize("env", **by_id(BUILTINS))
def test_builtin_prompts_end_with_the_format_hint(env):
    for task in sample_tasks(env, 10):
        assert task.messages[-1]["content"].endswith(FORMAT_HINT), task.id


def format_near_misses(task: Task) -> dict[str, str]:
    """Replies that carry the right answer in a wrong form, or nothing at all; each must score 0."""
    answer, tag = task.answer, answer_tag(task.answer)
    misses = {
        "empty": "",
        "whitespace": " \n\t ",
        "no tag": answer,
        "two answer blocks": tag + tag,
        "two gold replies": task.solution + "\n" + task.solution,
        "text before the tag": f"The answer is {tag}",
        "text after the tag": f"{tag} Hope that helps!",
        "extra text in the tag": answer_tag(f"the answer is {answer}"),
        "nested tags": f"<answer>{tag}</answer>",
        "unclosed nested tag": f"<answer><answer>{answer}</answer>",
        "think after the answer": f"{tag}<think>done</think>",
        "unclosed tag": f"<answer>{answer}",
        "garbage unicode": garbage_unicode(1),
        "garbage unicode in the tag": answer_tag(garbage_unicode(2)),
        "1 MB of text": "x" * MEGABYTE,
        "1 MB of whitespace around the gold reply": " " * MEGABYTE + task.solution,
        "1 MB answer": answer_tag("9" * MEGABYTE),
    }
    if INTEGER.fullmatch(answer):  # whole numbers: only the canonical digits count
        misses.update(
            {
                "appended digit": answer_tag(answer + "0"),
                "leading zero": answer_tag(("-0" + answer[1:]) if answer.startswith("-") else "0" + answer),
                "decimal": answer_tag(answer + ".0"),
                "plus sign": answer_tag("+" + answer),
                "unit": answer_tag(answer + " dollars"),
            }
        )
    return misses


@pytest.mark.parametrize("env", **by_id(ENVS))
def test_format_near_misses_score_zero_quickly(env):
    for task in sample_tasks(env, 4):
        for name, reply in format_near_misses(task).items():
            started = time.perf_counter()
            verdict = env.verify(task, reply)
            assert time.perf_counter() - started < 0.25, f"{task.id}: {name} took too long"
            assert verdict.reward == 0.0, f"{task.id}: {name} scored {verdict}"


@pytest.mark.parametrize("env", **by_id(BUILTINS))
def test_builtin_check_never_raises_on_garbage(env):
    """`check` itself (not only `verify`, which guards it) survives anything and stays fast."""
    for task in sample_tasks(env, 3):
        for answer in ["", garbage_unicode(3), "9" * MEGABYTE, "(" * 5000, "\x00", None, 12, ["a"]]:
            started = time.perf_counter()
            verdict = env.check(task, answer)
            assert time.perf_counter() - started < 0.25
            assert verdict.reward == 0.0, (task.id, answer)


# ---------------------------------------------------------------------------------------------------
# per-environment near-misses


def scores(env: Environment, task: Task, answer: str) -> float:
    return env.verify(task, answer_tag(answer)).reward


@pytest.mark.parametrize("level", [1, 2, 3])
def test_countdown_accepts_any_working_expression_and_nothing_else(level):
    env = load_environment("countdown")
    for task in env.tasks(4, 30, level):
        numbers, target = task.data["numbers"], task.data["target"]
        assert scores(env, task, task.answer.replace(" ", "")) == 1.0  # spacing is free in an expression
        assert scores(env, task, f"({task.answer})") == 1.0
        # reusing a number: each extra "+ n - n" pair uses n twice more than the numbers hold
        n = numbers[0]
        reused = f"({task.answer})" + f" + {n} - {n}" * numbers.count(n)
        assert env.verify(task, answer_tag(reused)).reason.startswith("uses ")
        # only given numbers, each once, but the wrong value
        if numbers[0] + numbers[1] != target:
            verdict = env.verify(task, answer_tag(f"{numbers[0]} + {numbers[1]}"))
            assert verdict.reward == 0.0 and verdict.reason.startswith("the expression makes")
        for bad in [
            f"{task.answer} = {target}",
            str(target),  # the target is never among the numbers
            f"__import__('os').system('echo {target}')",
            f"({task.answer}) * 1.0",
            f"({task.answer}) ** 1",
            f"-(-({task.answer}))",
            f"({task.answer}) // 1",
            f"{numbers[0]} / 0",
            "()",
            "(" * 300 + "1" + ")" * 300,
            "lambda: 1",
        ]:
            assert scores(env, task, bad) == 0.0, (task.id, bad)


def test_countdown_rules_are_those_the_prompt_states():
    env = load_environment("countdown")
    task = Task("countdown-v1", 0, 0, 1, [], "", "", {"numbers": [2, 3, 7, 7], "target": 10})
    assert scores(env, task, "3 + 7") == 1.0
    assert scores(env, task, "7 + 3") == 1.0
    assert scores(env, task, "(7 * 2 - 7 + 3)") == 1.0  # both 7s, each once
    assert scores(env, task, "7 + 7 - 2 * 2") == 0.0  # 2 twice
    assert scores(env, task, "7 / 2 * 2 + 3") == 0.0  # 7 / 2 is not whole, even though the total is 10
    assert scores(env, task, "(7 + 3) / (7 - 7)") == 0.0  # division by zero
    assert scores(env, task, "3 + 7 + 0") == 0.0  # 0 is not given
    assert scores(env, task, "03 + 7") == 0.0  # not a Python number literal


@pytest.mark.parametrize("level", [1, 2, 3])
def test_logic_wrong_roles_order_or_spelling_score_zero(level):
    env = load_environment("logic")
    for task in env.tasks(4, 30, level):
        parts = task.answer.split(", ")
        swapped = ["knave" if "knight" in part else "knight" for part in parts]
        flipped_one = [parts[0].replace("knight", "X").replace("knave", "knight").replace("X", "knave"), *parts[1:]]
        for bad in [
            ", ".join(f"{part[0]}={role}" for part, role in zip(parts, swapped, strict=True)),
            ", ".join(flipped_one),
            ", ".join(reversed(parts)),
            ",".join(parts),
            task.answer.replace("=k", "=K"),
            task.answer.replace("=", " = "),
            task.answer.replace(", ", " and "),
            ", ".join(parts[:-1]),
        ]:
            assert scores(env, task, bad) == 0.0, (task.id, bad)


def test_logic_puzzles_have_exactly_one_solution():
    """The stated gold is the only assignment of roles that fits the statements, checked from the text alone."""
    from atomlab.envs.builtin import _claims, _consistent

    env = load_environment("logic")
    for level in (1, 2, 3):
        for task in env.tasks(9, 20, level):
            people = level + 1
            said = []
            for speaker, text in enumerate(task.data["statements"]):
                said.append(next(claim for claim in _claims(speaker, people) if claim[0] == text))
            (roles,) = _consistent(said, people)
            assert task.answer == ", ".join(f"{'ABCD'[p]}={'knight' if r else 'knave'}" for p, r in enumerate(roles))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_list_ops_wrong_order_and_other_list_forms_score_zero(level):
    env = load_environment("list-ops")
    for task in env.tasks(4, 30, level):
        values = task.answer.split(", ")
        if len(values) > 1:
            bad = [
                ", ".join(reversed(values)) if values != values[::-1] else None,
                ", ".join(sorted(values, key=int)) if values != sorted(values, key=int) else None,
                ",".join(values),
                f"[{task.answer}]",
                " ".join(values),
                ", ".join(values[:-1]),
                f"{task.answer},",
            ]
        else:
            bad = [str(int(task.answer) + 1), f"[{task.answer}]"]
        for answer in filter(None, bad):
            assert scores(env, task, answer) == 0.0, (task.id, answer)


def test_list_ops_dedupe_keeps_first_occurrences_in_place():
    env = load_environment("list-ops")
    found = 0
    for task in env.tasks(2, 200, 1):
        if task.data["steps"] == ["dedupe"]:
            found += 1
            assert task.answer == ", ".join(str(v) for v in dict.fromkeys(task.data["values"]))
    assert found


@pytest.mark.parametrize("level", [1, 2, 3])
def test_strings_case_quotes_and_spacing_matter(level):
    env = load_environment("strings")
    for task in env.tasks(4, 30, level):
        variants = {task.answer.upper(), task.answer.lower(), f'"{task.answer}"', task.answer[::-1], task.answer + "s"}
        for answer in variants - {task.answer}:
            assert scores(env, task, answer) == 0.0, (task.id, answer)


@pytest.mark.parametrize("name", ["arithmetic", "word-problems", "sequence"])
def test_numeric_answers_off_by_one_score_zero(name):
    env = load_environment(name)
    for task in sample_tasks(env, 30, seed=4):
        value = int(task.answer)
        for answer in (value - 1, value + 1, -value if value else 1):
            assert scores(env, task, str(answer)) == 0.0, (task.id, answer)


def test_sequence_questions_have_one_continuation():
    from atomlab.envs.builtin import _continuations

    env = load_environment("sequence")
    for task in sample_tasks(env, 30, seed=4):
        shown = task.messages[0]["content"].split(": ", 1)[1].split(", ...?")[0]
        assert _continuations([int(term) for term in shown.split(", ")]) == {int(task.answer)}, task.id


def test_whitespace_inside_the_tag_and_one_think_block_are_allowed():
    env = load_environment("list-ops")
    task = env.task(1, 0, 2)
    assert env.verify(task, f"<think>sorting...</think>\n<answer> {task.answer}\n</answer>\n").reward == 1.0


@pytest.mark.parametrize("env", **by_id([env for env in ENVS if env.max_turns == 1]))
def test_one_turn_episode_ends_with_the_verdict(env):
    episode = env.reset(seed=3, index=2, difficulty=env.levels)
    observation, reward, terminated, truncated, info = episode.step(episode.task.solution)
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert observation[-1] == {"role": "assistant", "content": episode.task.solution}
    with pytest.raises(RuntimeError):
        episode.step("again")
    _, reward, terminated, _, info = env.reset(seed=3, index=2).step("I don't know")
    assert (reward, terminated) == (0.0, True) and info["reason"]


# ---------------------------------------------------------------------------------------------------
# plugins through the `atomlab.environments` entry-point group

PLUGIN_MODULE = """
from atomlab.envs.base import FORMAT_HINT, Environment, answer_tag


class Echo(Environment):
    name = "echo-test"
    description = "Repeat a number (a test plugin)."
    levels = 2

    def make(self, rng, difficulty):
        number = str(rng.randint(0, 10 ** (difficulty + 2)))
        return f"Repeat {number}. {FORMAT_HINT}", number, answer_tag(number), {}
"""


@pytest.fixture
def echo_plugin(tmp_path, monkeypatch) -> str:
    """An installed-looking distribution: a module and a dist-info folder with entry_points.txt on sys.path."""
    (tmp_path / "atomlab_echo_plugin.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "atomlab_echo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: atomlab-echo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[atomlab.environments]\necho-test = atomlab_echo_plugin:Echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "atomlab_echo_plugin", raising=False)  # removed again afterwards
    return "echo-test"


def test_entry_point_environment_is_found_listed_and_shown(echo_plugin, capsys):
    env = load_environment(echo_plugin)
    assert env.id == "echo-test-v1" and load_environment("echo-test-v1").id == env.id
    task = env.task(1, 0, 2)
    assert env.verify(task, task.solution).reward == 1.0
    assert env.id in [found.id for found in list_environments()]
    assert main(["envs", "list"]) == 0
    assert "echo-test-v1" in capsys.readouterr().out
    assert main(["envs", "show", "echo-test", "--difficulty", "2"]) == 0
    assert "verdict on the gold reply: reward 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "target, message",
    [("builtins:object", "did not give an atomlab Environment"), ("no_such_module_here:Env", "failed to load")],
)
def test_broken_entry_point_is_a_one_line_error(echo_plugin, tmp_path, capsys, target, message):
    info = tmp_path / "atomlab_echo_plugin-0.1.dist-info" / "entry_points.txt"
    info.write_text(f"[atomlab.environments]\necho-test = {target}\n")
    assert main(["envs", "show", "echo-test"]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the `atomlab envs` command


def test_envs_list_shows_every_environment(capsys):
    assert main(["envs", "list"]) == 0
    out = capsys.readouterr().out
    for env in ENVS:
        assert env.id in out
    assert "levels" in out and "turns" in out and "description" in out


def test_envs_show_prints_prompt_gold_and_verdict(capsys):
    assert main(["envs", "show", "countdown", "--seed", "7", "--index", "3", "--difficulty", "2"]) == 0
    out = capsys.readouterr().out
    task = load_environment("countdown").task(7, 3, 2)
    assert task.id in out and task.messages[0]["content"] in out
    assert f"gold answer: {task.answer}" in out and f"gold reply: {task.solution}" in out
    assert "verdict on the gold reply: reward 1 (correct)" in out


def test_envs_show_json_is_one_task_per_line(capsys):
    assert main(["envs", "show", "logic-v1", "--count", "3", "--index", "5", "--difficulty", "3", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["index"] for record in records] == [5, 6, 7]
    assert all(record["gold_verdict"] == {"reward": 1.0, "reason": "correct"} for record in records)
    assert records[0]["answer"] == load_environment("logic").task(1, 5, 3).answer


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["envs", "show", "no-such-env"], "not found"),
        (["envs", "show", "arithmetic", "--difficulty", "4"], "--difficulty must be 1..3"),
        (["envs", "show", "arithmetic", "--count", "0"], "--count"),
    ],
)
def test_envs_show_mistakes_are_one_line_and_exit_2(arguments, message, capsys):
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
