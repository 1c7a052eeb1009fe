"""The `atomlab` command: one subcommand per stage, plus run and verify.

User mistakes raise AtomlabError, printed here as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from atomlab import __version__, launch
from atomlab import plan as plan_command
from atomlab.data import cli as data_cli
from atomlab.ecosystem import cli as ecosystem_cli
from atomlab.envs import cli as envs_cli
from atomlab.errors import AtomlabError
from atomlab.evaluate import lm_eval as lm_eval_cli
from atomlab.hub import client as hub_cli
from atomlab.infer import chat, server
from atomlab.pipeline import STEP_NAMES, build_steps, select
from atomlab.recipe import load_recipe
from atomlab.release import hf, openness, reproduce, sign
from atomlab.steps import execute, plan
from atomlab.train.distributed import cleanup, current_world, setup


def _run(args: argparse.Namespace, until: str | None) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    out_dir = Path(recipe.out_dir)
    steps = select(build_steps(recipe), until)
    if args.dry_run:
        print(f"recipe {recipe.source} (name {recipe.name}, seed {recipe.seed}); outputs under {out_dir}/")
        for entry in plan(steps, out_dir):
            verb = {"reuse": "reuse (finished)", "run": "run", "resume": "run (interrupted; --resume continues it)"}
            print(f"  {entry.step.name:<13} {verb[entry.status]:<40} {entry.folder}")
        return 0
    world = current_world()
    if world.distributed:  # under torchrun: join the job before any step, so ranks can wait for rank 0
        from atomlab.device import pick_device

        world = setup(pick_device(recipe.train.device).type)
    finished = False
    try:
        done = execute(steps, out_dir, resume=args.resume, restart=args.restart, seed=recipe.seed, world=world)
        finished = True
    finally:
        cleanup(finished)
    if world.is_main:
        last = steps[-1].name
        print(f"done: {last} -> {done[last]}")
        if last == "release":
            metrics = json.loads((done[last] / "metrics.json").read_text())
            if "held_out_bits_per_byte" in metrics:
                print(
                    f"held-out bits per byte of the released {metrics['released_stage']} model: "
                    f"{metrics['held_out_bits_per_byte']:.4f}; bundle: {done[last]}"
                )
            else:  # a run that started from an existing model ([init]) has no held-out text of its own
                print(f"post-trained from {metrics['base_model']}; bundle: {done[last]}")
    if world.distributed:
        # Everything is written and the process group is gone; skip interpreter teardown, where gloo's
        # threads sometimes abort the process ("terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="atomlab", description="Build truly open language models.")
    top.add_argument("--version", action="version", version=f"atomlab {__version__}")
    commands = top.add_subparsers(dest="command", required=True)

    def stage(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "recipe", nargs="?", default="tiny", help="recipe file, or tiny / smoke (shipped); default tiny"
        )
        sub.add_argument("overrides", nargs="*", help="KEY=VALUE settings, e.g. train.lr=1e-3 model.n_layers=2")
        sub.add_argument("--dry-run", action="store_true", help="print the plan and what would be reused, do nothing")
        sub.add_argument(
            "--resume", action="store_true", help="continue an interrupted pretrain from its last checkpoint"
        )
        sub.add_argument("--restart", action="store_true", help="discard an interrupted pretrain and start it again")
        return sub

    stage("run", "run every step: prepare-data, tokenizer, pretrain, evaluate, release").set_defaults(until=None)
    for name in STEP_NAMES:
        stage(name, f"run the steps up to {name}").set_defaults(until=name)
    sign.register(commands)  # keygen, sign, verify
    reproduce.register(commands)
    launch.register(commands)
    plan_command.register(commands)
    chat.register(commands)
    server.register(commands)
    hf.register(commands)
    openness.register(commands)
    lm_eval_cli.register(commands)
    envs_cli.register(commands)
    data_cli.register(commands)
    hub_cli.register(commands)
    ecosystem_cli.register(commands)
    return top


def honour_interrupts() -> None:
    """A background job of a non-interactive shell (`atomlab run tiny &` in a script) starts with SIGINT
    ignored, so `kill -INT` would be lost; atomlab takes it, as in the foreground, to mean "finish the step,
    keep the last checkpoint and stop"."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    honour_interrupts()
    args = parser().parse_args(argv)
    try:
        if hasattr(args, "handler"):
            return args.handler(args)
        return _run(args, args.until)
    except AtomlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(
            "interrupted: finished steps and the last complete checkpoint are kept; rerun with --resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
