"""Speed of the environments: tasks generated per second and replies verified per second.

    python benchmarks/envs_speed.py                      # every registered environment
    python benchmarks/envs_speed.py --envs countdown logic --tasks 500 --repeats 3   # quicker

Writes benchmarks/results/envs_speed.json. For each environment the same tasks (seed 0, the levels
taken in turn) are generated, then verified against their gold replies (all correct) and against
wrong replies, `<answer>(GOLD) + 7</answer>`: well formed, so each goes through the whole check
rather than failing at extraction (for countdown it is an expression to parse and evaluate, and
always off the target by 7). Each rate is the median over repeats in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from atomlab.envs import Environment, Task, list_environments, load_environment
from atomlab.envs.base import answer_tag

RESULTS = Path(__file__).parent / "results" / "envs_speed.json"


def rate(work, count: int, repeats: int) -> float:
    """Items per second of `work()`, which handles `count` items; the median over repeats."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return count / statistics.median(seconds)


def measure(env: Environment, count: int, repeats: int) -> dict:
    levels = [1 + i % env.levels for i in range(count)]

    def generate() -> list[Task]:
        return [env.task(0, index, level) for index, level in enumerate(levels)]

    tasks = generate()
    gold = [task.solution for task in tasks]
    wrong = [answer_tag(f"({task.answer}) + 7") for task in tasks]
    rewards = {"gold": 0.0, "wrong": 0.0}

    def verify(kind: str, replies: list[str]) -> None:
        rewards[kind] = sum(env.verify(task, reply).reward for task, reply in zip(tasks, replies, strict=True))

    verify("gold", gold)  # warm-up: the first pass pays for imports, regex compiles and cold caches
    verify("wrong", wrong)
    result = {
        "levels": env.levels,
        "tasks_per_s": rate(generate, count, repeats),
        "gold_verifications_per_s": rate(lambda: verify("gold", gold), count, repeats),
        "wrong_verifications_per_s": rate(lambda: verify("wrong", wrong), count, repeats),
    }
    # The figures are only worth having if the verifier did its job on these replies.
    result["gold_mean_reward"], result["wrong_mean_reward"] = rewards["gold"] / count, rewards["wrong"] / count
    return result


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", help="environment names (default: all registered)")
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per repeat (default 3000)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats; the median is reported (default 7)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()

    envs = [load_environment(name) for name in options.envs] if options.envs else list_environments()
    results = {}
    for env in envs:
        results[env.id] = measure(env, options.tasks, options.repeats)

    table = Table(title=f"environments: {options.tasks} tasks (levels in turn), median of {options.repeats}")
    for column in ("environment", "tasks/s", "gold verifications/s", "wrong verifications/s", "gold / wrong reward"):
        table.add_column(column, justify="left" if column == "environment" else "right")
    for name, row in results.items():
        table.add_row(
            name,
            f"{row['tasks_per_s']:,.0f}",
            f"{row['gold_verifications_per_s']:,.0f}",
            f"{row['wrong_verifications_per_s']:,.0f}",
            f"{row['gold_mean_reward']:.2f} / {row['wrong_mean_reward']:.2f}",
        )
    Console(width=120).print(table)
    report = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "python": platform.python_version(),
        "settings": {"tasks": options.tasks, "repeats": options.repeats, "seed": 0},
        "environments": results,
    }
    options.output.parent.mkdir(exist_ok=True)
    options.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {options.output}")


if __name__ == "__main__":
    main()
