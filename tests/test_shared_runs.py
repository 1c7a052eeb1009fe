"""Two jobs sharing one runs folder: a step runs once, the other job waits for it and reuses it."""

import fcntl
import shutil
import subprocess
import sys
import time

from atomlab.pipeline import build_steps
from atomlab.recipe import load_recipe
from atomlab.steps import list_files, load_manifest
from tests.conftest import step_folder

SETTINGS = ["train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2", "train.checkpoint_every=2"]


def test_two_jobs_at_once_run_a_step_once_and_both_finish(smoke_run, tmp_path):
    work = tmp_path / "shared"
    for step in ("prepare-data", "tokenizer"):
        shutil.copytree(step_folder(smoke_run, step), work / "runs" / step_folder(smoke_run, step).name)
    pretrain = next(s for s in build_steps(load_recipe("smoke", SETTINGS)) if s.name == "pretrain")
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    command = [sys.executable, "-m", "atomlab.cli", "pretrain", "smoke", *SETTINGS]
    # This test holds the step's lock first, so both jobs surely meet it held, then lets them go.
    with open(work / "runs" / f".{pretrain.dirname}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        jobs = [subprocess.Popen(command, cwd=work, stdout=open(log, "w"), stderr=subprocess.STDOUT) for log in logs]
        deadline = time.time() + 600
        while not all("[wait]" in log.read_text() for log in logs):
            assert all(job.poll() is None for job in jobs) and time.time() < deadline, [x.read_text() for x in logs]
            time.sleep(0.1)
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert [job.wait(timeout=900) for job in jobs] == [0, 0], [log.read_text() for log in logs]
    outputs = [log.read_text() for log in logs]
    assert sum(out.count("[run]   pretrain") for out in outputs) == 1, outputs  # one ran it...
    assert sum(out.count("[reuse] pretrain") for out in outputs) == 1, outputs  # ...the other waited and reused it
    assert outputs[0].splitlines()[-1] == outputs[1].splitlines()[-1] == f"done: pretrain -> runs/{pretrain.dirname}"
    assert not list((work / "runs").glob("*.partial"))
    for step in ("prepare-data", "tokenizer", "pretrain"):  # nothing deleted or half-replaced
        folder = step_folder(work, step)
        assert list_files(folder) == load_manifest(folder)["outputs"]
