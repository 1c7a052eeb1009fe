"""`atomlab envs`: list the environments, show their tasks; `atomlab envs rollout` comes from rollout.py."""

from __future__ import annotations

import argparse
import json
from typing import Any

from atomlab.envs import rollout
from atomlab.envs.base import Environment, Task
from atomlab.envs.registry import list_environments, load_environment
from atomlab.errors import AtomlabError


def _levels(env: Environment) -> str:
    return "1" if env.levels == 1 else f"1-{env.levels}"


def run_list(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True)
    table.add_column("levels", justify="right", no_wrap=True)
    table.add_column("turns", justify="right", no_wrap=True)
    table.add_column("description")
    for env in list_environments():
        table.add_row(env.id, _levels(env), str(env.max_turns), env.description)
    # highlight off: rich would colour the numbers inside descriptions at random
    Console(highlight=False).print(table)
    return 0


def _task_record(env: Environment, task: Task) -> dict[str, Any]:
    verdict = env.verify(task, task.solution)
    return {
        "id": task.id,
        "env": task.env,
        "seed": task.seed,
        "index": task.index,
        "difficulty": task.difficulty,
        "prompt_hash": task.prompt_hash,
        "messages": task.messages,
        "answer": task.answer,
        "solution": task.solution,
        "data": task.data,
        "gold_verdict": {"reward": verdict.reward, "reason": verdict.reason},
    }


def run_show(args: argparse.Namespace) -> int:
    env = load_environment(args.name)  # an unknown name is an AtomlabError naming the known ones
    if not 1 <= args.difficulty <= env.levels:
        raise AtomlabError(f"{env.id}: --difficulty must be 1..{env.levels}, got {args.difficulty}")
    if args.count < 1 or args.index < 0:
        raise AtomlabError("--count must be at least 1 and --index at least 0")
    for task in env.tasks(args.seed, args.count, args.difficulty, start=args.index):
        record = _task_record(env, task)
        if args.json:  # one task per line (JSON Lines), ready to append to a data file
            print(json.dumps(record, ensure_ascii=False, default=str))
            continue
        # plain print, not rich: prompts hold brackets and such that rich would read as markup
        print(f"== {task.id}  (prompt hash {task.prompt_hash})")
        for message in task.messages:
            print(f"[{message['role']}]\n{message['content']}")
        print(f"gold answer: {task.answer}")
        print(f"gold reply: {task.solution}")
        verdict = record["gold_verdict"]
        print(f"verdict on the gold reply: reward {verdict['reward']:g} ({verdict['reason']})\n")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `atomlab envs list|show|rollout` to the CLI's subcommands."""
    envs = commands.add_parser(
        "envs",
        help="training environments: list them, show their tasks, roll them out",
        description="Seeded tasks with strict verifiers, for RL, SFT data and evaluation.",
    )
    subcommands = envs.add_subparsers(dest="envs_command", required=True)
    listing = subcommands.add_parser("list", help="the built-in and installed environments")
    listing.set_defaults(handler=run_list)
    show = subcommands.add_parser("show", help="print tasks of one environment with their gold replies")
    show.add_argument("name", help="environment name or versioned id (arithmetic, arithmetic-v1, ...)")
    show.add_argument("--seed", type=int, default=1, help="task seed (default 1)")
    show.add_argument("--index", type=int, default=0, help="index of the first task (default 0)")
    show.add_argument("--difficulty", type=int, default=1, help="difficulty level (default 1)")
    show.add_argument("--count", type=int, default=1, help="how many tasks, from --index on (default 1)")
    show.add_argument("--json", action="store_true", help="one JSON object per task and line")
    show.set_defaults(handler=run_show)
    rollout.register(subcommands)
