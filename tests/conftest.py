"""Shared fixtures: one finished smoke run per test session, in a temporary working folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
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


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny models: on a shared 2-core machine, one thread is several times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bundle_copy(smoke_run, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(step_folder(smoke_run, "release"), target)
    return target


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(arguments: list[str], health: str):
    """A real `atomlab ...` server started with `arguments` plus a free `--port`, for as long as the block
    runs, once `health` (a path) answers 200: yields its URL."""
    import time
    import urllib.request

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "atomlab.cli", *arguments, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}{health}", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"server did not start: {process.stdout.read()}")
        time.sleep(0.2)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def serving(bundle: Path, *options: str):
    """A real `atomlab serve` of bundle on a free port, for as long as the block runs: yields its URL."""
    with running_server(["serve", str(bundle), *options], "/health") as url:
        yield url


@contextmanager
def headless_chromium(profile: Path):
    """A real headless Chromium (Debian's chromium and chromium-driver) driven by Selenium."""
    import shutil

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/test.sh installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        yield browser
    finally:
        browser.quit()
