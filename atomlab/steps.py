"""The step graph: hashed output folders, skip-if-done, manifests, atomic completion.

A step is a function of (its config slice, its inputs' outputs). Its folder is
`{out_dir}/{name}-{hash}` where the hash covers the step name, its config slice, the hashes of
its inputs and the atomlab version, so a rerun reuses finished steps and a changed setting
reruns only what depends on it. A step works in `{folder}.partial` and is renamed into place
when complete, with `manifest.json` listing every output file with its sha256 and size.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomlab import __version__
from atomlab.errors import AtomlabError
from atomlab.train.distributed import SINGLE_PROCESS, World, barrier, broadcast_object

MANIFEST = "manifest.json"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def list_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under folder except the manifest itself: relative path -> sha256 and size."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def code_version() -> dict[str, Any]:
    """The atomlab version and, when run from a git checkout, its commit and whether it is dirty."""
    info: dict[str, Any] = {"atomlab": __version__, "python": sys.version.split()[0]}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def host_info() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "user": getpass.getuser() if hasattr(os, "getuid") else "",
    }


@dataclass
class Step:
    """One node of the graph. `run(ctx)` writes its outputs into `ctx.folder`."""

    name: str
    config: dict[str, Any]
    inputs: list[Step]
    run: Callable[[StepContext], dict[str, Any] | None]
    resumable: bool = False
    collective: bool = False  # run by every process of a torchrun job, not rank 0 alone
    hash: str = field(init=False, default="")

    def __post_init__(self) -> None:
        payload = {
            "step": self.name,
            "config": self.config,
            "inputs": {s.name: s.hash for s in self.inputs},
            "atomlab": __version__,
        }
        self.hash = hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.hash}"


@dataclass
class StepContext:
    step: Step
    folder: Path  # where to write (the .partial folder while running)
    inputs: dict[str, Path]  # input step name -> its finished folder
    resume: bool
    seed: int


def is_complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def load_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


@dataclass
class PlanEntry:
    step: Step
    folder: Path
    status: str  # "reuse", "run", "resume"


def plan(steps: list[Step], out_dir: Path) -> list[PlanEntry]:
    entries = []
    for step in steps:
        folder = out_dir / step.dirname
        if is_complete(folder):
            status = "reuse"
        elif Path(f"{folder}.partial").exists():
            status = "resume" if step.resumable else "run"
        else:
            status = "run"
        entries.append(PlanEntry(step, folder, status))
    return entries


def _fresh_folder(partial: Path, step: Step, keep: bool, restart: bool) -> None:
    if partial.exists() and step.resumable and not keep and not restart:
        raise AtomlabError(
            f"{partial}: step {step.name} was interrupted; pass --resume to continue it or --restart to discard it"
        )
    if partial.exists() and not keep:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)


def _finish(
    ctx: StepContext, folder: Path, done: dict[str, Path], summary: dict | None, started: float, world: World
) -> None:
    """Run a single-process step if not yet run, then write its manifest and rename it into place."""
    step, partial = ctx.step, ctx.folder
    if summary is None:
        summary = step.run(ctx) or {}
    finished = time.time()
    manifest = {
        "step": step.name,
        "hash": step.hash,
        "config": step.config,
        "inputs": {
            s.name: {
                "folder": done[s.name].name,
                "hash": s.hash,
                "manifest_sha256": sha256_file(done[s.name] / MANIFEST),
            }
            for s in step.inputs
        },
        "outputs": list_files(partial),
        "summary": summary,
        "code": code_version(),
        "host": host_info(),
        "processes": world.size if step.collective else 1,
        "timing": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
            "seconds": round(finished - started, 3),
        },
    }
    write_json(partial / MANIFEST, manifest)
    if folder.exists():  # a stale folder without manifest: never a finished step
        shutil.rmtree(folder)
    os.replace(partial, folder)


def _run_on_main(world: World, action: Callable[[], Any]) -> Any:
    """Run `action` on rank 0 only; every rank gets its result, or raises the same user error."""
    outcome: Any = None
    if world.is_main:
        try:
            outcome = ("ok", action())
        except AtomlabError as exc:
            outcome = ("error", str(exc))
            if not world.distributed:
                raise
    outcome = broadcast_object(outcome) if world.distributed else outcome
    if outcome[0] == "error":
        raise AtomlabError(outcome[1])
    return outcome[1]


def execute(
    steps: list[Step],
    out_dir: Path,
    *,
    resume: bool = False,
    restart: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
    world: World = SINGLE_PROCESS,
) -> dict[str, Path]:
    """Run the steps in order (they are given topologically), reusing finished ones.

    Under torchrun every process calls this: rank 0 runs the single-process steps while the
    others wait, `collective` steps (pretraining) run on all, and rank 0 alone writes manifests
    and renames folders.
    """
    log = log if world.is_main else (lambda message: None)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    entries = plan(steps, out_dir)
    # rank 0's view of the disk decides for all: the others may look only after it has changed
    statuses = broadcast_object([entry.status for entry in entries]) if world.distributed else None
    for index, entry in enumerate(entries):
        step, folder = entry.step, entry.folder
        status = statuses[index] if statuses else entry.status
        if status == "reuse":
            log(f"[reuse] {step.name:<13} {folder}")
            done[step.name] = folder
            continue
        partial = Path(f"{folder}.partial")
        keep_partial = step.resumable and resume
        _run_on_main(world, lambda: _fresh_folder(partial, step, keep_partial, restart))  # noqa: B023 - called at once
        log(f"[run]   {step.name:<13} {folder}")
        started = time.time()
        ctx = StepContext(step, partial, {s.name: done[s.name] for s in step.inputs}, resume, seed)
        summary = None
        if step.collective:
            summary = step.run(ctx) or {}
            barrier()
        _run_on_main(world, lambda: _finish(ctx, folder, done, summary, started, world))  # noqa: B023
        done[step.name] = folder
    return done
