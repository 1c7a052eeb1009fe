"""The step graph: hashed output folders, skip-if-done, manifests, atomic completion.

A step is a function of (its config slice, its inputs' outputs). Its folder is
`{out_dir}/{name}-{hash}` where the hash covers the step name, the settings of its config slice
that change results (recipe.py marks the others NOT_HASHED), the hashes of its inputs and the code
that runs (a digest of the atomlab package's files plus the major versions of torch and
tokenizers), so a rerun reuses finished steps and a changed setting or source file reruns only
what depends on it. A step works in `{folder}.partial` and is renamed into place
when complete, with `manifest.json` listing every output file with its sha256 and size.

Several runs may share one runs folder: a run holds the lock `.{name}-{hash}.lock` beside a step's
folder (an flock, released by the kernel when the process dies) while it decides whether the step
is finished and, if not, runs it. A second run that needs the same step waits for the lock, then
finds the step finished and reuses it; nobody deletes or replaces a folder another run is writing.
"""

from __future__ import annotations

import fcntl
import functools
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomlab import __version__
from atomlab.errors import AtomlabError
from atomlab.manifest import MANIFEST, sha256_file
from atomlab.train.distributed import SINGLE_PROCESS, World, barrier, broadcast_object


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


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


def package_digest(root: Path) -> str:
    """sha256 over every file of a package folder (relative path and content; caches and hidden files
    aside): the same for an installed wheel and a checkout of the same sources, wherever they lie."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and "__pycache__" not in rel.parts and not any(p.startswith(".") for p in rel.parts):
            digest.update(f"{rel.as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def major_version(version: str) -> str:
    """'2.13.0+cpu' -> '2'; a 0.x version keeps its minor ('0.22.1' -> '0.22'), where semver breaks."""
    parts = version.split("+")[0].split(".")
    return parts[0] if parts[0] != "0" else ".".join(parts[:2])


@functools.cache
def code_identity() -> dict[str, str]:
    """What a step's hash records of the code that runs it (computed once per process)."""
    import tokenizers
    import torch

    return {
        "atomlab_source": package_digest(Path(__file__).resolve().parent),
        "torch": major_version(torch.__version__),
        "tokenizers": major_version(tokenizers.__version__),
    }


def code_version() -> dict[str, Any]:
    """The atomlab version and source digest and, from a git checkout, its commit and whether it is dirty."""
    info: dict[str, Any] = {
        "atomlab": __version__,
        "atomlab_source": code_identity()["atomlab_source"],
        "python": sys.version.split()[0],
    }
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


def cpu_model() -> str:
    """The CPU's model name, as benchmarks report the machine a figure came from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU features that pick the kernels, and so the rounding, of float maths (SSE4, AVX, AVX2, AVX-512, AMX)
ROUNDING_FLAGS = ("avx", "amx", "fma", "f16c", "sse4")


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix instruction sets (Linux's /proc/cpuinfo), [] where it is not known."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted({f for f in line.split(":", 1)[1].split() if f.startswith(ROUNDING_FLAGS)})
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """What decides a result's floating-point rounding on this machine: CPU model and instruction sets,
    cores and threads, torch and the kernels it picked, the GPU."""
    import torch

    return {
        "cpu": cpu_model(),
        "architecture": platform.machine(),
        "instruction_set": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }


def host_info() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
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
    # the part of config the hash covers (config less the NOT_HASHED settings); None: all of config
    identity: dict[str, Any] | None = None
    hash: str = field(init=False, default="")

    def __post_init__(self) -> None:
        payload = {
            "step": self.name,
            "config": self.config if self.identity is None else self.identity,
            "inputs": {s.name: s.hash for s in self.inputs},
            "code": code_identity(),
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


def status_of(step: Step, folder: Path) -> str:
    if is_complete(folder):
        return "reuse"
    if Path(f"{folder}.partial").exists():
        return "resume" if step.resumable else "run"
    return "run"


def plan(steps: list[Step], out_dir: Path) -> list[PlanEntry]:
    return [PlanEntry(step, out_dir / step.dirname, status_of(step, out_dir / step.dirname)) for step in steps]


@contextmanager
def step_lock(folder: Path, log: Callable[[str], None], enabled: bool = True) -> Iterator[None]:
    """Hold the step folder's lock for the block, waiting (and saying so) while another run holds it."""
    if not enabled:  # the other processes of a torchrun job: rank 0 holds the lock for the job
        yield
        return
    with open(folder.with_name(f".{folder.name}.lock"), "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[wait]  {folder.name}: another run is working on this step; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    for step in steps:
        folder = out_dir / step.dirname
        with step_lock(folder, log, enabled=world.is_main):
            # decided under the lock (another run may have just finished the step), by rank 0 for all
            status = _run_on_main(world, lambda: status_of(step, folder))  # noqa: B023 - called at once
            if status == "reuse":
                log(f"[reuse] {step.name:<13} {folder}")
                done[step.name] = folder
                continue
            partial = Path(f"{folder}.partial")
            keep_partial = step.resumable and resume
            _run_on_main(world, lambda: _fresh_folder(partial, step, keep_partial, restart))  # noqa: B023
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
