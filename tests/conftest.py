"""Shared fixtures: one finished smoke run per test session, in a temporary working folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atomlab.cli import main

ROOT = Path(__file__).resolve().parent.parent


def atomlab(*args: str, cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `atomlab` command line in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "atomlab.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"atomlab {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A working folder holding a complete smoke run under runs/."""
    folder = tmp_path_factory.mktemp("smoke")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["run", "smoke"]) == 0
    finally:
        os.chdir(cwd)
    return folder


def step_folder(work: Path, step: str) -> Path:
    found = [p for p in (work / "runs").glob(f"{step}-*") if not p.name.endswith(".partial")]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def bundle_copy(smoke_run, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(step_folder(smoke_run, "release"), target)
    return target
