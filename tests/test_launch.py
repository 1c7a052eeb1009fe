"""atomlab launch: the Slurm batch script and the local torchrun command, checked without Slurm or training.

Slurm's commands are replaced by small stand-in scripts placed first on PATH; the generated batch
script is run by bash with them, so what srun would receive is checked word for word.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from atomlab.cli import honour_interrupts
from atomlab.errors import AtomlabError
from atomlab.launch import register, run_forwarding_interrupt

# An override that breaks any command line built without quoting: quotes, $, backticks, &, spaces.
TRICKY = 'release.description=it\'s a "quoted" $HOME `date` & more'
SPACES = "data.sources=['my corpus/a b.txt']"


def launch(*argv: str) -> int:
    top = argparse.ArgumentParser()
    commands = top.add_subparsers(dest="command")
    register(commands)
    args = top.parse_args(["launch", *argv])
    return args.handler(args)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working folder, made the current one (Path.cwd() is its resolved path)."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return Path.cwd()


def stand_in(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def run_batch_script(script: Path, tmp_path: Path, **env: str) -> tuple[list[str], str]:
    """Run the script as Slurm would on the first node; returns srun's arguments and the exported settings."""
    bin_dir = tmp_path / "bin"
    record = tmp_path / "srun-args"
    # Many more lines than a pipe holds: reading only the first line would kill scontrol with SIGPIPE.
    stand_in(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"\nseq -f "node-%g" 1 50000\n')
    stand_in(
        bin_dir,
        "srun",
        'printf "%s\\0" "$@" > "$RECORD"\n'
        'printf "%s %s %s\\n" "$MASTER_ADDR" "$MASTER_PORT" "$OMP_NUM_THREADS" > "$RECORD.env"\n'
        'pwd > "$RECORD.pwd"\n',
    )
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_CPUS_PER_TASK": "32",
    }
    environment = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), **slurm, **env}
    subprocess.run(["bash", str(script)], env=environment, check=True, capture_output=True, text=True)
    return record.read_text().split("\0")[:-1], Path(f"{record}.env").read_text().strip()


def test_slurm_script_directives_and_command(work, tmp_path, capsys):
    argv = ["slurm", "smoke", "train.lr=1e-3", TRICKY, SPACES, "--nodes", "2", "--gpus-per-node", "4"]
    assert launch(*argv, "--partition", "gpu", "--account", "proj", "--time", "1-02:00:00") == 0
    script = work / "runs" / "slurm" / "atomlab-smoke.sbatch"
    assert f"wrote {Path('runs/slurm/atomlab-smoke.sbatch')}" in capsys.readouterr().out
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n")
    directives = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=atomlab-smoke",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--cpus-per-task=32",
        "--time=1-02:00:00",
        "--partition=gpu",
        "--account=proj",
        f'--output="{work}/runs/slurm/%x-%j.out"',
        f'--error="{work}/runs/slurm/%x-%j.err"',
        "--requeue",
        "--open-mode=append",
    ]
    assert (work / "runs" / "slurm").is_dir()  # Slurm does not create the log folder
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert f"cd {work}\n" in text
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in text
    assert "export OMP_NUM_THREADS=8 " in text

    srun_args, exported = run_batch_script(script, tmp_path)
    assert srun_args == [
        "--cpus-per-task=32",
        "--kill-on-bad-exit=1",
        sys.executable,  # the Python of this environment, so the job uses the same virtualenv
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "4",
        "--rdzv-id",
        "4242",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node-a:24242",
        "-m",
        "atomlab.cli",
        "run",
        "smoke",
        "train.lr=1e-3",
        TRICKY,
        SPACES,
    ]
    assert exported == "node-a 24242 8"

    # A requeued job runs the same script again and must continue from its checkpoint.
    requeued, _ = run_batch_script(script, tmp_path, SLURM_RESTART_COUNT="1")
    assert requeued == [*srun_args, "--resume"]


def test_slurm_resume_script_path_and_job_name(work, tmp_path):
    argv = ["slurm", "smoke", "--nodes", "1", "--gpus-per-node", "2", "--job-name", "exp-1", "--cpus-per-task", "6"]
    assert launch(*argv, "--script", "jobs/exp1.sh", "--resume") == 0
    script = work / "jobs" / "exp1.sh"
    assert not (work / "runs" / "slurm" / "exp-1.sbatch").exists()
    text = script.read_text()
    assert "#SBATCH --job-name=exp-1\n" in text
    assert "#SBATCH --cpus-per-task=6\n" in text
    assert "#SBATCH --time" not in text and "#SBATCH --partition" not in text and "#SBATCH --account" not in text
    assert "SLURM_RESTART_COUNT" not in text  # --resume is always passed
    srun_args, exported = run_batch_script(script, tmp_path)
    assert srun_args[-5:] == ["-m", "atomlab.cli", "run", "smoke", "--resume"]
    assert srun_args[srun_args.index("--nproc-per-node") + 1] == "2"
    assert exported == "node-a 24242 3"


def test_slurm_script_in_a_folder_with_spaces_quotes_and_percent(tmp_path, monkeypatch):
    folder = tmp_path / 'my "runs" 100%'
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert launch("slurm", "smoke", "--nodes", "2", "--gpus-per-node", "1") == 0
    script = folder / "runs" / "slurm" / "atomlab-smoke.sbatch"
    text = script.read_text()
    # sbatch reads the #SBATCH line itself: double quotes group, backslash escapes, %% is a literal %.
    escaped = str(Path.cwd()).replace('"', '\\"').replace("%", "%%")
    assert f'#SBATCH --output="{escaped}/runs/slurm/%x-%j.out"\n' in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    srun_args, _ = run_batch_script(script, tmp_path)
    assert srun_args[-2:] == ["run", "smoke"]
    assert (tmp_path / "srun-args.pwd").read_text() == f"{Path.cwd()}\n"  # the job ran in the launch folder


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["smoke", "--nodes", "0", "--gpus-per-node", "1"], "launch slurm --nodes: must be at least 1, got 0"),
        (["smoke", "--nodes", "1", "--gpus-per-node", "0"], "launch slurm --gpus-per-node: must be at least 1"),
        (["smoke", "--nodes", "1", "--gpus-per-node", "1", "--cpus-per-task", "0"], "--cpus-per-task: must be"),
        (["smoke", "--nodes", "1", "--gpus-per-node", "1", "--time", "2h"], "expected HH:MM:SS or D-HH:MM:SS"),
        (["smoke", "--nodes", "1", "--gpus-per-node", "1", "--time", "12:61:00"], "expected HH:MM:SS"),
        (["smoke", "--nodes", "1", "--gpus-per-node", "1", "--job-name", "my job"], "--job-name 'my job': use"),
        (["smoke", "--nodes", "1", "--gpus-per-node", "1", "--partition", "gpu;rm"], "--partition 'gpu;rm'"),
        (["nope.toml", "--nodes", "1", "--gpus-per-node", "1"], "nope.toml: recipe not found"),
        (["smoke", "train.lr=-1", "--nodes", "1", "--gpus-per-node", "1"], "train.lr input should be greater than 0"),
        (["smoke", "train.learning_rate=1", "--nodes", "1", "--gpus-per-node", "1"], "unknown key"),
        (["smoke", "--nodes", "3", "--gpus-per-node", "1"], "train.batch_size (8) must be divisible by the 3"),
    ],
)
def test_slurm_bad_input_is_one_clear_error_and_writes_nothing(work, argv, message):
    with pytest.raises(AtomlabError) as caught:
        launch("slurm", *argv)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert list(work.iterdir()) == []


def test_submit_without_sbatch_is_a_clear_error(work, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(AtomlabError) as caught:
        launch("slurm", "smoke", "--nodes", "1", "--gpus-per-node", "1", "--submit")
    script = Path("runs/slurm/atomlab-smoke.sbatch")
    assert str(caught.value) == (f"launch --submit: sbatch not found on PATH; submit {script} from a Slurm login node")
    assert (work / script).is_file()  # written, ready to be submitted elsewhere


def test_submit_runs_sbatch_with_the_script_and_prints_the_job_id(work, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    record = tmp_path / "sbatch-args"
    stand_in(bin_dir, "sbatch", f'printf "%s\\0" "$@" > {shlex.quote(str(record))}\necho "Submitted batch job 4242"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert launch("slurm", "smoke", "--nodes", "2", "--gpus-per-node", "2", "--submit") == 0
    assert record.read_text().split("\0")[:-1] == [str(work / "runs" / "slurm" / "atomlab-smoke.sbatch")]
    assert "submitted batch job 4242" in capsys.readouterr().out


def test_submit_reports_sbatch_refusing(work, tmp_path, monkeypatch):
    stand_in(
        tmp_path / "bin", "sbatch", 'echo "sbatch: error: Batch job submission failed: Invalid account" >&2\nexit 1\n'
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(AtomlabError, match="failed \\(exit code 1\\): sbatch: error: .*Invalid account"):
        launch("slurm", "smoke", "--nodes", "1", "--gpus-per-node", "1", "--submit")


def test_local_print_gives_the_torchrun_command(work, capsys):
    assert launch("local", "smoke", "train.parallel=fsdp", TRICKY, "--nproc", "2", "--resume", "--print") == 0
    printed = capsys.readouterr().out.strip()
    expected = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    expected += ["-m", "atomlab.cli", "run", "smoke", "train.parallel=fsdp", TRICKY, "--resume"]
    assert shlex.split(printed) == expected
    # Pasted into a shell, the printed line gives the same words.
    echoed = subprocess.run(
        ["bash", "-c", 'words() { printf "%s\\0" "$@"; }; words ' + printed], capture_output=True, text=True, check=True
    )
    assert echoed.stdout.split("\0")[:-1] == expected


def test_local_bad_input(work):
    with pytest.raises(AtomlabError, match="launch local --nproc: must be at least 1"):
        launch("local", "smoke", "--nproc", "0", "--print")
    with pytest.raises(AtomlabError, match="must be divisible by the 3 processes"):
        launch("local", "smoke", "--nproc", "3", "--print")


def test_local_run_returns_the_exit_code(tmp_path):
    assert run_forwarding_interrupt([sys.executable, "-c", "raise SystemExit(7)"]) == 7


def test_local_run_passes_an_interrupt_on_and_waits(tmp_path):
    ready, caught = tmp_path / "ready", tmp_path / "caught"
    child = (
        "import pathlib, sys, time\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "try:\n"
        "    time.sleep(300)\n"
        "except KeyboardInterrupt:\n"
        f"    pathlib.Path({str(caught)!r}).touch()\n"
        "    sys.exit(3)\n"
    )

    def interrupt_when_ready() -> None:
        deadline = time.monotonic() + 300  # a loaded machine can take long to start Python
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # to this process alone, as `kill -INT PID` would

    # As `atomlab` does at start: a suite run as a background job starts with SIGINT ignored, and the
    # child inherits whatever this process does with it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        honour_interrupts()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        threading.Thread(target=interrupt_when_ready, daemon=True).start()
        assert run_forwarding_interrupt([sys.executable, "-c", child]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert caught.exists()  # the child got the SIGINT, and had finished when the call returned
