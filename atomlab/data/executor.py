"""Run the tasks of a data stage on an existing engine: processes on this machine, or Ray.

A stage is split into tasks (a file shard, a hash partition); each task is a call of a module-level
function that writes its own output files atomically and returns a small summary. Tasks must be
idempotent: a task whose finished output already exists returns early, so a rerun after a crash
reuses every finished shard. Results always come back in task order, so what a stage writes from
them does not depend on how many workers ran it, or in which order they finished.

- `local` (the default, no extra dependency): `workers` processes on this machine (`spawn`, so a
  worker never inherits the parent's threads); `workers = 1` runs in this process.
- `ray`: tasks on a Ray cluster (`pip install 'atomlab[ray]'`), joined through `ray_address`
  (`auto`, or the address `ray start --head` or KubeRay printed); without an address and with no
  Ray already initialised, a single-node Ray is started for the stage and stopped after it. At most
  `workers` tasks are in flight at once. Cluster nodes need atomlab installed, as any Ray job does.

A task that fails is retried (`retries` more times); a worker process that dies (killed, out of
memory) is replaced and its unfinished tasks run again. A user error (AtomlabError: a corrupt
file, a missing column) is not retried: it stops the stage at once, naming the file.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Literal

from atomlab.errors import AtomlabError
from atomlab.progress import progress_bar

Executor = Literal["local", "ray"]
EXECUTORS = ("local", "ray")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the local executor's workers,
    joined at the end of every stage; Ray's workers are not children, so they are not counted)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_tasks(
    function: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    executor: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    description: str = "",
    retries: int = 2,
) -> list[Any]:
    """`[function(task) for task in tasks]`, run on `executor` with `workers` at a time, in task order."""
    if executor not in EXECUTORS:
        raise AtomlabError(f"data.executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise AtomlabError(f"data.workers must be at least 1, got {workers}")
    if not tasks:
        return []
    label = description or getattr(function, "__name__", "tasks")
    with progress_bar(label, total=len(tasks)) as bar:
        if executor == "ray":
            return _run_ray(function, tasks, workers, ray_address, retries, label, bar.update)
        if workers == 1:
            return _run_here(function, tasks, retries, label, bar.update)
        return _run_processes(function, tasks, workers, retries, label, bar.update)


def _give_up(label: str, index: int, attempts: int, error: BaseException) -> AtomlabError:
    return AtomlabError(f"{label}: task {index} failed {attempts} times; last error: {type(error).__name__}: {error}")


def _run_here(
    function: Callable[[Any], Any], tasks: Sequence[Any], retries: int, label: str, report: Callable[[int], None]
) -> list[Any]:
    results = []
    for index, task in enumerate(tasks):
        for attempt in range(retries + 1):
            try:
                results.append(function(task))
                break
            except AtomlabError:
                raise
            except Exception as exc:
                if attempt == retries:
                    raise _give_up(label, index, attempt + 1, exc) from exc
        report(index + 1)
    return results


@contextmanager
def _one_thread_per_worker():
    """Workers are one per core: keep their numeric libraries to one thread each."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_processes(
    function: Callable[[Any], Any],
    tasks: Sequence[Any],
    workers: int,
    retries: int,
    label: str,
    report: Callable[[int], None],
) -> list[Any]:
    results: list[Any] = [None] * len(tasks)
    done = [False] * len(tasks)
    attempts = [0] * len(tasks)
    finished = 0
    context = multiprocessing.get_context("spawn")
    while finished < len(tasks):
        with _one_thread_per_worker(), ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            running = {pool.submit(function, tasks[i]): i for i in range(len(tasks)) if not done[i]}
            broken: BaseException | None = None
            while running and broken is None:
                ready, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in ready:
                    index = running.pop(future)
                    try:
                        results[index] = future.result()
                    except AtomlabError:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
                    except BrokenProcessPool as exc:  # a worker died: every unfinished task is lost
                        broken = exc
                        running[future] = index
                        break
                    except Exception as exc:
                        attempts[index] += 1
                        if attempts[index] > retries:
                            pool.shutdown(wait=False, cancel_futures=True)
                            raise _give_up(label, index, attempts[index], exc) from exc
                        running[pool.submit(function, tasks[index])] = index
                        continue
                    done[index] = True
                    finished += 1
                    report(finished)
            if broken is not None:
                for index in running.values():
                    attempts[index] += 1
                    if attempts[index] > retries:
                        raise _give_up(label, index, attempts[index], broken) from broken
    return results


def _run_ray(
    function: Callable[[Any], Any],
    tasks: Sequence[Any],
    workers: int,
    address: str | None,
    retries: int,
    label: str,
    report: Callable[[int], None],
) -> list[Any]:
    try:
        import ray
        from ray.exceptions import RayTaskError
    except ImportError:
        raise AtomlabError("data.executor = 'ray' needs Ray: pip install 'atomlab[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                started_here = True
        except Exception as exc:  # Ray raises plain Exceptions too ("node timed out during startup")
            where = address or "a new local node"
            raise AtomlabError(f"data.ray_address: cannot start or join Ray at {where}: {exc}") from None
    # max_retries covers a worker process that dies; exceptions raised by the task are retried below
    remote = ray.remote(num_cpus=1, max_retries=retries)(function)
    results: list[Any] = [None] * len(tasks)
    attempts = [0] * len(tasks)
    queue = list(range(len(tasks)))
    running: dict[Any, int] = {}
    finished = 0
    try:
        while queue or running:
            while queue and len(running) < workers:
                index = queue.pop(0)
                running[remote.remote(tasks[index])] = index
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                index = running.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                    if isinstance(cause, AtomlabError):
                        raise AtomlabError(str(cause)) from None
                    attempts[index] += 1
                    if attempts[index] > retries:
                        raise _give_up(label, index, attempts[index], cause) from None
                    queue.insert(0, index)
                    continue
                finished += 1
                report(finished)
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
    return results
