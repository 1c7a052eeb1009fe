"""The data executor: task order kept, failures retried, dead workers replaced, user errors not retried."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from atomlab.data.executor import run_tasks
from atomlab.errors import AtomlabError


def digest(task: tuple[str, int]) -> str:
    text, rounds = task
    value = text.encode()
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return value.hex()


def die_once(task: tuple[str, int]) -> int:
    """Kill the worker process the first time a task runs (a marker file remembers), then succeed."""
    marker, value = task
    if value == 3 and not Path(marker).exists():
        Path(marker).write_text("died")
        os._exit(1)
    return value * value


def fail_once(task: tuple[str, int]) -> int:
    marker, value = task
    if not Path(f"{marker}.{value}").exists():
        Path(f"{marker}.{value}").write_text("failed")
        raise RuntimeError("transient")
    return value + 1


def user_error(task: int) -> int:
    if task == 2:
        raise AtomlabError(f"shard-{task}.jsonl:7: not JSON")
    return task


def always_fails(task: int) -> int:
    raise RuntimeError(f"broken {task}")


TASKS = [(f"doc {i}", 200 + 37 * (i % 5)) for i in range(12)]


def test_results_in_task_order_whatever_the_worker_count():
    expected = [digest(task) for task in TASKS]
    assert run_tasks(digest, TASKS, workers=1) == expected
    assert run_tasks(digest, TASKS, workers=2) == expected


def test_a_killed_worker_is_replaced_and_its_task_rerun(tmp_path):
    tasks = [(str(tmp_path / "marker"), value) for value in range(6)]
    assert run_tasks(die_once, tasks, workers=2) == [v * v for v in range(6)]
    assert (tmp_path / "marker").read_text() == "died"


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_tasks_are_retried(tmp_path, workers):
    tasks = [(str(tmp_path / "marker"), value) for value in range(4)]
    assert run_tasks(fail_once, tasks, workers=workers) == [1, 2, 3, 4]


@pytest.mark.parametrize("workers", [1, 2])
def test_user_errors_stop_at_once_and_persistent_failures_give_up(workers):
    with pytest.raises(AtomlabError, match=r"shard-2.jsonl:7: not JSON"):
        run_tasks(user_error, list(range(5)), workers=workers)
    with pytest.raises(AtomlabError, match=r"failed 2 times; last error: RuntimeError: broken"):
        run_tasks(always_fails, [0, 1], workers=workers, retries=1, description="map")


def test_bad_settings_are_user_errors():
    with pytest.raises(AtomlabError, match="data.executor"):
        run_tasks(digest, TASKS, executor="spark")
    with pytest.raises(AtomlabError, match="data.workers"):
        run_tasks(digest, TASKS, workers=0)


def test_ray_gives_the_same_results_in_order(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    # Ray's workers import the task functions by module name: let them find this test module
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run_tasks(digest, TASKS, executor="ray", workers=2) == [digest(task) for task in TASKS]
        tasks = [(str(tmp_path / "marker"), value) for value in range(3)]
        assert run_tasks(fail_once, tasks, executor="ray", workers=2) == [1, 2, 3]
        with pytest.raises(AtomlabError, match=r"shard-2.jsonl:7: not JSON"):
            run_tasks(user_error, list(range(4)), executor="ray", workers=2)
    finally:
        ray.shutdown()
