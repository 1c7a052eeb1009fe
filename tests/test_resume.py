"""Kill and resume: a run killed (SIGKILL or Ctrl-C) and resumed ends bitwise equal to one that was not."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atomlab.steps import sha256_file
from tests.conftest import atomlab, step_folder

# A slower pretrain than the smoke recipe's, so there is time to interrupt it between checkpoints.
SETTINGS = [
    "model.d_model=64",
    "model.seq_len=128",
    "train.batch_size=16",
    "train.max_steps=80",
    "train.checkpoint_every=20",
    "train.eval_every=40",
    "train.sample_every=80",
]


def workdir(smoke_run: Path, tmp_path: Path, name: str) -> Path:
    """A working folder that already holds the smoke run's finished data and tokenizer steps."""
    work = tmp_path / name
    for step in ("prepare-data", "tokenizer"):
        shutil.copytree(step_folder(smoke_run, step), work / "runs" / step_folder(smoke_run, step).name)
    return work


def start(work: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "atomlab.cli", "pretrain", "smoke", *SETTINGS, *extra],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # Started with SIGINT ignored, as a background job of a script is: atomlab still takes `kill -INT`.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )


def interrupt_after_checkpoint(work: Path, sig: int, step: int = 40) -> subprocess.Popen:
    process = start(work)
    deadline = time.time() + 300
    while time.time() < deadline:
        if list((work / "runs").glob(f"pretrain-*.partial/checkpoints/step_{step:07d}")):
            break
        if process.poll() is not None:
            pytest.fail(f"pretrain ended before it could be interrupted: {process.communicate()}")
        time.sleep(0.02)
    os.killpg(process.pid, sig)
    process.wait(timeout=300)  # SIGINT: the loop finishes its step and exits; slow on a loaded machine
    return process


def final_weights(work: Path) -> str:
    return sha256_file(step_folder(work, "pretrain") / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(smoke_run, tmp_path_factory) -> str:
    work = workdir(smoke_run, tmp_path_factory.mktemp("straight"), "w")
    atomlab("pretrain", "smoke", *SETTINGS, cwd=work)
    return final_weights(work)


def test_sigkill_then_resume_is_bitwise_identical(smoke_run, tmp_path, uninterrupted):
    work = workdir(smoke_run, tmp_path, "killed")
    interrupt_after_checkpoint(work, signal.SIGKILL)
    partial = next((work / "runs").glob("pretrain-*.partial"))
    assert list((partial / "checkpoints").glob("step_*"))
    assert (work / "runs" / step_folder(smoke_run, "tokenizer").name / "manifest.json").is_file()

    refused = atomlab("pretrain", "smoke", *SETTINGS, cwd=work, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr

    (partial / "checkpoints" / "step_9999999.partial").mkdir()  # a checkpoint torn by the kill is ignored
    resumed = atomlab("pretrain", "smoke", *SETTINGS, "--resume", cwd=work)
    assert "resumed from" in resumed.stdout
    assert final_weights(work) == uninterrupted
    steps = [line for line in (step_folder(work, "pretrain") / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 80  # the log holds each step once, not the replayed ones twice


def test_ctrl_c_keeps_checkpoint_and_resume_matches(smoke_run, tmp_path, uninterrupted):
    work = workdir(smoke_run, tmp_path, "interrupted")
    process = interrupt_after_checkpoint(work, signal.SIGINT)
    assert process.returncode == 130
    stderr = process.stderr.read()
    assert "--resume" in stderr and "Traceback" not in stderr
    atomlab("pretrain", "smoke", *SETTINGS, "--resume", cwd=work)
    assert final_weights(work) == uninterrupted


@pytest.mark.parametrize("damage", ["flip", "truncate", "metadata"])
def test_corrupt_checkpoint_on_resume_is_a_clear_error(smoke_run, tmp_path, damage):
    work = workdir(smoke_run, tmp_path, damage)
    interrupt_after_checkpoint(work, signal.SIGKILL, step=20)
    latest = sorted((work / "runs").glob("pretrain-*.partial/checkpoints/step_*"))[-1]
    weights = latest / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (latest / "checkpoint.json").write_text("{")
    result = atomlab("pretrain", "smoke", *SETTINGS, "--resume", cwd=work, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(latest.relative_to(work)) in result.stderr and "--restart" in result.stderr
    if damage == "flip":  # --restart is the way out
        atomlab("pretrain", "smoke", *SETTINGS, "--restart", cwd=work)
        assert (step_folder(work, "pretrain") / "model.safetensors").is_file()


def test_metrics_mirror_to_tensorboard(smoke_run, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = workdir(smoke_run, tmp_path, "tensorboard")
    atomlab("pretrain", "smoke", "train.max_steps=10", "train.eval_every=5", "train.tensorboard=true", cwd=work)
    events = EventAccumulator(str(step_folder(work, "pretrain") / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("loss")) == 10 and len(events.Scalars("val_bpb")) == 2
