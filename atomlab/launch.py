"""`atomlab launch`: start a run on several processes, as a Slurm batch job or with torchrun here.

Both only build a command line. Every process runs the same `atomlab run RECIPE overrides...`
under torchrun, which gives each its rank; the training code does the rest. The recipe and
overrides are validated before anything is written or started, so a typo fails here rather
than hours later at the head of a queue.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from atomlab.errors import AtomlabError
from atomlab.recipe import Recipe, load_recipe
from atomlab.steps import write_atomic

SLURM_DIR = Path("runs") / "slurm"
CPUS_PER_GPU = 8  # default --cpus-per-task is this times --gpus-per-node
# Values that go into #SBATCH lines, which sbatch parses itself (not the shell): keep them plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
PARTITION_PATTERN = re.compile(r"^[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*$")  # one partition or a list
TIME_PATTERN = re.compile(r"^(\d+-)?\d+:[0-5]\d:[0-5]\d$")  # HH:MM:SS or D-HH:MM:SS


def run_arguments(recipe: str, overrides: list[str], resume: bool) -> list[str]:
    """What follows `python -m torch.distributed.run ...`: the command every process runs."""
    return ["-m", "atomlab.cli", "run", recipe, *overrides, *(["--resume"] if resume else [])]


def check_recipe(recipe: str, overrides: list[str], processes: int) -> Recipe:
    """Load and validate the recipe as `atomlab run` will, and check its layout fits the processes."""
    from atomlab.train.loop import model_args
    from atomlab.train.parallel import check_layout, resolve_layout

    loaded = load_recipe(recipe, overrides)
    try:
        layout = resolve_layout(loaded.train.parallel, processes)
        # the tokenizer's vocabulary is known once it is trained; its configured size stands in for it here
        check_layout(layout, model_args(loaded.model, loaded.tokenizer.vocab_size), loaded.train.batch_size)
    except AtomlabError as exc:
        raise AtomlabError(f"{loaded.source}: {exc} (launching {processes} processes)") from None
    return loaded


@dataclass
class SlurmJob:
    recipe: str
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    job_name: str
    cpus_per_task: int
    workdir: Path  # absolute: the job runs here, so relative recipe and data paths mean what they meant here
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    resume: bool = False
    python: str = sys.executable

    @property
    def log_dir(self) -> Path:
        return self.workdir / SLURM_DIR


def _directive_value(text: str) -> str:
    """A value for an #SBATCH line: sbatch groups on double quotes and reads backslash escapes."""
    if "\n" in text:
        raise AtomlabError(f"{text!r}: a line break cannot go into an #SBATCH directive")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _log_pattern(job: SlurmJob, suffix: str) -> str:
    # %x is the job name and %j the job id; a literal % in the folder's path is written %%.
    folder = str(job.log_dir).replace("%", "%%")
    return _directive_value(f"{folder}/%x-%j.{suffix}")


def slurm_script(job: SlurmJob) -> str:
    """The text of a Slurm batch script running the job: one torchrun per node, one process per GPU."""
    directives = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={job.gpus_per_node}",
        f"--cpus-per-task={job.cpus_per_task}",
    ]
    if job.time:
        directives.append(f"--time={job.time}")
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.account:
        directives.append(f"--account={job.account}")
    directives += [
        f"--output={_log_pattern(job, 'out')}",
        f"--error={_log_pattern(job, 'err')}",
        "--requeue",  # a preempted or failed-node job goes back to the queue instead of ending
        "--open-mode=append",  # a requeued job keeps its id: append to its logs rather than overwrite them
    ]
    threads = max(1, job.cpus_per_task // job.gpus_per_node)
    run = shlex.join(run_arguments(job.recipe, job.overrides, job.resume))
    lines = [
        "#!/bin/bash",
        f"# Written by `atomlab launch slurm`: {job.nodes} node(s) x {job.gpus_per_node} GPU(s); command at the end.",
        "# Submit it with `sbatch THIS_FILE` from any folder.",
        *(f"#SBATCH {directive}" for directive in directives),
        "",
        "set -euo pipefail",
        "",
        "# The folder `atomlab launch` ran in: the recipe, its data and runs/ are relative to it.",
        f"cd {shlex.quote(str(job.workdir))}",
        "",
        "# Rendezvous on the first node of the job. The port comes from the job id so that two jobs",
        "# sharing a node do not collide. (sed, not head -n1: head stops reading early, and scontrol",
        "# writing on would then die of SIGPIPE, which pipefail turns into a failed job.)",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export MASTER_ADDR MASTER_PORT",
        f"export OMP_NUM_THREADS={threads}  # CPU threads per process: cpus-per-task / GPUs per node",
        "export PYTHONUNBUFFERED=1  # log lines reach the .out file as they are printed",
        "",
        "# NCCL settings worth knowing when nodes do not find each other, or run slowly:",
        "# export NCCL_DEBUG=INFO            # print the network and transport NCCL picked",
        "# export NCCL_SOCKET_IFNAME=ib0     # the network interface between nodes (see `ip addr`)",
        "# export NCCL_IB_HCA=mlx5           # the InfiniBand adapters to use",
        "# export NCCL_IB_DISABLE=1          # no InfiniBand: use TCP sockets",
        "",
    ]
    if not job.resume:
        # Without --resume a rerun stops at the interrupted pretrain step; a requeued job is such a rerun.
        lines += [
            "# A requeued job (preemption, node failure, `scontrol requeue`) runs this script again:",
            "# continue from the last complete checkpoint.",
            'RESUME=""',
            'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then RESUME=1; fi',
            "",
        ]
        run += " ${RESUME:+--resume}"
    lines += [
        'echo "atomlab: job $SLURM_JOB_ID, $SLURM_NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# srun starts one torchrun per node (--ntasks-per-node=1), each starting one process per GPU.",
        "# --cpus-per-task is passed on because some Slurm versions do not give srun the job's value.",
        'srun --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \\',
        f"  {shlex.quote(job.python)} -m torch.distributed.run \\",
        f'  --nnodes "$SLURM_NNODES" --nproc-per-node {job.gpus_per_node} \\',
        '  --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \\',
        f"  {run}",
        "",
    ]
    return "\n".join(lines)


def _check_count(value: int, option: str) -> None:
    if value < 1:
        raise AtomlabError(f"launch {option}: must be at least 1, got {value}")


def _check_plain(value: str | None, option: str, pattern: re.Pattern[str], example: str) -> None:
    if value is not None and not pattern.match(value):
        raise AtomlabError(f"launch slurm {option} {value!r}: use letters, digits, '.', '_' and '-' (e.g. {example})")


def write_slurm_script(args: argparse.Namespace) -> tuple[Path, SlurmJob]:
    """Validate the arguments and the recipe, then write the batch script; nothing is written on error."""
    _check_count(args.nodes, "slurm --nodes")
    _check_count(args.gpus_per_node, "slurm --gpus-per-node")
    if args.cpus_per_task is not None:
        _check_count(args.cpus_per_task, "slurm --cpus-per-task")
    if args.time is not None and not TIME_PATTERN.match(args.time):
        raise AtomlabError(f"launch slurm --time {args.time!r}: expected HH:MM:SS or D-HH:MM:SS, e.g. 24:00:00")
    _check_plain(args.job_name, "--job-name", NAME_PATTERN, "atomlab-tiny")
    _check_plain(args.partition, "--partition", PARTITION_PATTERN, "gpu or gpu,gpu-long")
    _check_plain(args.account, "--account", NAME_PATTERN, "my-project")
    recipe = check_recipe(args.recipe, args.overrides, args.nodes * args.gpus_per_node)

    workdir = Path.cwd()
    job = SlurmJob(
        recipe=args.recipe,
        overrides=list(args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        job_name=args.job_name or f"atomlab-{recipe.name}",
        cpus_per_task=args.cpus_per_task or CPUS_PER_GPU * args.gpus_per_node,
        workdir=workdir,
        time=args.time,
        partition=args.partition,
        account=args.account,
        resume=args.resume,
    )
    script = Path(args.script) if args.script else SLURM_DIR / f"{job.job_name}.sbatch"
    if script.is_dir():
        raise AtomlabError(f"launch slurm --script {script}: is a folder; give the path of the file to write")
    text = slurm_script(job)  # before any folder is made: a value Slurm cannot carry fails here
    script.parent.mkdir(parents=True, exist_ok=True)
    job.log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log folder itself
    write_atomic(script, text)
    return script, job


def submit(script: Path) -> str:
    """`sbatch SCRIPT`; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise AtomlabError(f"launch --submit: sbatch not found on PATH; submit {script} from a Slurm login node")
    result = subprocess.run([sbatch, str(script.resolve())], capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip() or result.stdout.strip() or "no message").splitlines()[-1]
        raise AtomlabError(f"launch --submit: sbatch {script} failed (exit code {result.returncode}): {reason}")
    found = re.search(r"Submitted batch job (\d+)", result.stdout)
    if found is None:
        raise AtomlabError(f"launch --submit: sbatch {script} answered {result.stdout.strip()!r}, not a job id")
    return found.group(1)


def launch_slurm(args: argparse.Namespace) -> int:
    script, job = write_slurm_script(args)
    print(f"wrote {script} ({job.nodes} node(s) x {job.gpus_per_node} GPU(s), recipe {job.recipe})")
    if not args.submit:
        logs = SLURM_DIR / f"{job.job_name}-<job id>"
        print(f"submit it with: sbatch {script}   (or add --submit); logs will be {logs}.out and .err")
        return 0
    job_id = submit(script)
    print(f"submitted batch job {job_id}; logs: {SLURM_DIR / f'{job.job_name}-{job_id}'}.out and .err")
    return 0


def torchrun_local_command(recipe: str, overrides: list[str], nproc: int, resume: bool) -> list[str]:
    """torchrun of this Python environment, one machine, nproc processes."""
    standalone = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable, *standalone, *run_arguments(recipe, overrides, resume)]


def run_forwarding_interrupt(command: list[str]) -> int:
    """Run command with output streaming to this terminal; return its exit code (128 + N if killed by signal N)."""
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        # Ctrl-C at a terminal reaches torchrun and its workers directly (same process group); this
        # passes on a SIGINT sent to this process alone. Then wait for torchrun to stop its workers,
        # so none outlives the command: they keep the last complete checkpoint.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        process.wait()
        print(
            "interrupted: finished steps and the last complete checkpoint are kept; rerun with --resume",
            file=sys.stderr,
        )
        return 130
    return code if code >= 0 else 128 - code


def launch_local(args: argparse.Namespace) -> int:
    _check_count(args.nproc, "local --nproc")
    check_recipe(args.recipe, args.overrides, args.nproc)
    command = torchrun_local_command(args.recipe, args.overrides, args.nproc, args.resume)
    if args.print_only:
        print(shlex.join(command))
        return 0
    print(f"[launch] {shlex.join(command)}", flush=True)
    return run_forwarding_interrupt(command)


def register(commands: argparse._SubParsersAction) -> None:
    """Add `launch slurm` and `launch local` to the atomlab command line; each sets args.handler."""
    launch = commands.add_parser(
        "launch", help="run on several GPUs or nodes: write (and submit) a Slurm job, or torchrun here"
    )
    targets = launch.add_subparsers(dest="target", required=True)

    def target(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = targets.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("recipe", help="recipe file, or tiny / smoke (shipped)")
        sub.add_argument(
            "overrides", nargs="*", help="KEY=VALUE settings right after the recipe, e.g. train.parallel=fsdp"
        )
        sub.add_argument(
            "--resume", action="store_true", help="continue an interrupted pretrain from its last checkpoint"
        )
        return sub

    slurm = target("slurm", "write a Slurm batch script running the recipe under torchrun on N nodes x G GPUs")
    slurm.add_argument("--nodes", type=int, required=True, help="number of nodes")
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (= processes) per node")
    slurm.add_argument("--partition", help="Slurm partition (or a comma-separated list)")
    slurm.add_argument("--account", help="Slurm account to charge")
    slurm.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS (default: the partition's)")
    slurm.add_argument("--job-name", help="job name, also the script's name (default atomlab-RECIPE_NAME)")
    slurm.add_argument(
        "--cpus-per-task", type=int, help=f"CPUs per node's task (default {CPUS_PER_GPU} x --gpus-per-node)"
    )
    slurm.add_argument("--script", help=f"where to write the script (default {SLURM_DIR}/JOB_NAME.sbatch)")
    slurm.add_argument("--submit", action="store_true", help="also submit it with sbatch and print the job id")
    slurm.set_defaults(handler=launch_slurm)

    local = target("local", "run the recipe under torchrun on this machine with N processes")
    local.add_argument("--nproc", type=int, required=True, help="number of processes (one per GPU; gloo on CPU)")
    local.add_argument("--print", dest="print_only", action="store_true", help="only print the torchrun command")
    local.set_defaults(handler=launch_local)
