"""Evaluations the hub computes itself: a member queues one (`atomlab hub evaluate NAME --env arithmetic
--by-hub`), the server's worker thread (or `atomlab hub worker`) lays the model version's files out from
the blob store, scores it with atomlab's own evaluation code (`score_model` on held-out tasks of the
environment) in a child process, and records the result as computed by the hub, beside the submitted ones.

The child process keeps the model's memory and compute out of the server; the worker runs one job at a
time, so evaluations queue rather than starve the uploads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from atomlab.errors import AtomlabError

# the hub picks the tasks, never the requester: held-out tasks of this seed (atomlab's held_out_seed of it)
HUB_SEED = 0
LIMITS = {"tasks": (1, 2000, 50), "samples": (1, 64, 1), "max_tokens": (1, 512, 32)}  # (lowest, highest, default)
JOB_SECONDS = 6 * 3600


def evaluation_request(body: dict[str, Any]) -> dict[str, Any]:
    """The settings of an evaluation job, checked: the environment exists here, the counts are in range."""
    from atomlab.envs.registry import load_environment

    env_name = body.get("environment")
    if not isinstance(env_name, str) or not env_name:
        raise ValueError("environment: the name of an environment the hub has, e.g. arithmetic")
    try:
        env = load_environment(env_name)
    except AtomlabError as exc:
        raise ValueError(f"environment: {exc}") from None
    request: dict[str, Any] = {"environment": env.id, "seed": HUB_SEED}
    for field, (lowest, highest, default) in LIMITS.items():
        value = body.get(field, default)
        if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= highest:
            raise ValueError(f"{field}: an integer from {lowest} to {highest}, got {value!r}")
        request[field] = value
    return request


def score_folder(folder: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Score the model in `folder` as the evaluate step scores a run's models (atomlab.evaluate)."""
    import torch

    from atomlab.evaluate.environments import score_model
    from atomlab.evaluate.lm_eval import load_engine
    from atomlab.posttrain.tasks import held_out_tasks
    from atomlab.recipe import EvaluateConfig

    torch.manual_seed(request["seed"])
    settings = EvaluateConfig(
        environments=[request["environment"]],
        tasks=request["tasks"],
        samples=request["samples"],
        max_tokens=request["max_tokens"],
    )
    engine = load_engine(folder, device="cpu")
    tasks = held_out_tasks(settings, request["seed"])
    scores = score_model(
        engine.model,
        engine.tokenizer,
        tasks,
        samples=settings.samples,
        max_tokens=settings.max_tokens,
        seed=request["seed"],
        chat_format=engine.chat_format,  # an imported model is prompted in its own template
    )
    result = scores["environments"][request["environment"]]
    return {key: value for key, value in result.items() if key != "correct"} | {"correct": result["correct"]}


def materialise(hub: Any, version: Any, folder: Path) -> None:
    """The version's files, from the blob store, laid out as they were pushed."""
    for file in version.files:
        target = folder / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        with hub.store.open(file.sha256) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)


def run_job(hub: Any, job_id: int) -> None:
    """Run one claimed job to its end, recording the evaluation (or the reason it failed)."""
    from atomlab.hub.db import AuditEntry, Evaluation, Job, utcnow

    with tempfile.TemporaryDirectory(dir=hub.store.staging, prefix="job-") as scratch:
        folder = Path(scratch) / "model"
        with hub.sessions() as session:  # no transaction stays open while the model is scored
            job = session.get(Job, job_id)
            request = dict(job.request)
            materialise(hub, job.version, folder)
        (Path(scratch) / "request.json").write_text(json.dumps(request))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "atomlab.hub.jobs", str(folder), str(Path(scratch) / "request.json")],
                capture_output=True,
                text=True,
                timeout=JOB_SECONDS,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
            failure = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no output"])[-1]
        except subprocess.TimeoutExpired:
            failure, done = f"ran past {JOB_SECONDS} s", None
    with hub.sessions() as session:
        job = session.get(Job, job_id)
        if failure is not None:
            job.state, job.error = "failed", failure[:2000]
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
            job.state, job.result = "done", result
            session.add(
                Evaluation(
                    version=job.version,
                    institution=job.institution,
                    task=request["environment"],
                    task_version="",
                    metric="pass@1",
                    value=float(result["pass@1"]),
                    computed_by_hub=True,
                    details={"job": job.id, "request": request, "pass@1_ci95": result["pass@1_ci95"]},
                )
            )
        job.finished_at = utcnow()
        target = f"{job.version.model.full_name}@{job.version.number}"
        session.add(
            AuditEntry(
                institution="hub",
                token_id="worker",
                action="evaluation",
                target=target,
                details={"job": job.id, "state": job.state, **request},
            )
        )
        session.commit()


def claim_next(hub: Any) -> int | None:
    """Take the oldest queued job (one worker wins it, even with several running): its id, or None."""
    from atomlab.hub.db import Job

    with hub.sessions() as session:
        for job_id in session.scalars(select(Job.id).where(Job.state == "queued").order_by(Job.id)):
            taken = session.execute(
                update(Job).where(Job.id == job_id, Job.state == "queued").values(state="running")
            ).rowcount
            session.commit()
            if taken:
                return job_id
    return None


def work(hub: Any, once: bool = False, idle_seconds: float = 5.0) -> int:
    """Run queued jobs until stopped (or, with `once`, until none is left); returns how many ran."""
    ran = 0
    while True:
        job_id = claim_next(hub)
        if job_id is None:
            if once:
                return ran
            hub.jobs_wanted.wait(idle_seconds)
            hub.jobs_wanted.clear()
            continue
        try:
            run_job(hub, job_id)
        except Exception as exc:  # a broken job must not stop the worker; it is marked failed
            _fail(hub, job_id, f"{type(exc).__name__}: {exc}")
        ran += 1


def _fail(hub: Any, job_id: int, reason: str) -> None:
    from atomlab.hub.db import Job, utcnow

    with hub.sessions() as session:
        job = session.get(Job, job_id)
        job.state, job.error, job.finished_at = "failed", reason[:2000], utcnow()
        session.commit()


def run_worker(args: argparse.Namespace) -> int:
    from atomlab.hub import db
    from atomlab.hub.server import Hub

    db.migrate(args.db)
    ran = work(Hub(args.db, args.store), once=args.once)
    print(f"ran {ran} job(s)")
    return 0


if __name__ == "__main__":  # the child process of run_job: score a folder, print the result as one JSON line
    folder, request_path = Path(sys.argv[1]), Path(sys.argv[2])
    print(json.dumps(score_folder(folder, json.loads(request_path.read_text()))))
