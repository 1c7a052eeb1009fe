"""`atomlab plan`'s memory and step time beside what atomlab's trainer measures, layout by layout, on this CPU.

    python benchmarks/planner_vs_measured.py [--steps 6]

Each layout runs as 4 processes under torchrun (gloo, fp32, one thread each) at a small shape: the trainer's
own pieces (`atomlab.train.distributed.parallelize`, `build_optimizer`, `lm_loss`, gradient clipping), a few
optimizer steps on random tokens. Measured per process:
- peak memory: the largest total of live tensor bytes at any moment (torch.distributed._tools.MemTracker,
  which follows every tensor storage through the dispatcher), the largest of the 4 processes. This is the
  quantity the planner predicts (`atomlab.plan.memory_per_gpu`): tensors, not the process's RSS, which adds
  the Python interpreter, torch's libraries, gloo's buffers and the allocator's caching (on a GPU the planner
  leaves those to its 10% headroom).
- step time: the median of the steps after the first (which allocates the optimizer state).
The planner's step time uses this CPU's measured fp32 matmul peak and its default CPU MFU; 4 processes on
fewer cores (and shared with other work) make it a loose check, reported, not claimed.
Writes benchmarks/results/planner_vs_measured.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "planner_vs_measured.json"
SHAPE = {"vocab_size": 2048, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "seq_len": 128}
BATCH = 8  # sequences per step over all data-parallel processes
PROCESSES = 4
LAYOUTS: dict[str, object] = {
    "DDP 4": "ddp",
    "FSDP 4": "fsdp",
    "HSDP 2 x 2": {"dp_replicate": 2, "dp_shard": 2, "tp": 1},
    "TP 2 x FSDP 2": {"dp_replicate": 1, "dp_shard": 2, "tp": 2},
}


def model_args():  # noqa: ANN201 (imports torch lazily: the parent process only plans)
    from atomlab.model import ModelArgs

    hidden = 32 * round(8 * SHAPE["d_model"] / 3 / 32)  # the recipe's SwiGLU width
    return ModelArgs(hidden=hidden, **SHAPE)


def worker(parallel: object, steps: int, out: Path) -> None:
    """One process of a layout: train `steps` steps as fit() does, record peak tensor bytes and step times."""
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.mem_tracker import MemTracker

    from atomlab.model import Transformer
    from atomlab.recipe import TrainConfig
    from atomlab.train.distributed import all_gather_objects, current_world, parallelize
    from atomlab.train.loop import build_optimizer, lm_loss
    from atomlab.train.parallel import check_layout, resolve_layout

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    args = model_args()
    world = current_world()
    layout = resolve_layout(parallel, world.size)
    check_layout(layout, args, BATCH)
    world = dataclasses.replace(world, tp=layout.tp)
    train = TrainConfig(batch_size=BATCH, max_steps=steps, warmup_steps=0, parallel=parallel)
    plain = Transformer(args)
    plain.init_weights(torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    model, net = parallelize(plain, world, layout=layout, device=device, compile=False, activation_checkpointing=False)
    del plain  # fit() keeps only the trained model (the plain one is its source under sharded layouts)
    optimizer = build_optimizer(model, train, device)
    local = BATCH // world.data_size
    generator = torch.Generator().manual_seed(1)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    times = []
    with tracker:
        for _ in range(steps):
            tokens = torch.randint(0, args.vocab_size, (BATCH, args.seq_len + 1), generator=generator)
            mine = tokens[world.data_rank * local : (world.data_rank + 1) * local]
            began = time.perf_counter()
            loss = lm_loss(net, mine[:, :-1], mine[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dist.barrier()
            times.append(time.perf_counter() - began)
            tracker.reset_mod_stats()  # its per-module statistics cover one iteration; the peak stays
    peak = tracker.get_tracker_snapshot("peak")
    found = {str(key): value for key, value in peak.items()}
    mine = {"peak": max(v["Total"] for v in found.values()), "parts": next(iter(found.values())), "times": times}
    everyone = all_gather_objects(mine)
    if world.is_main:
        out.write_text(json.dumps(everyone, default=str))
    dist.barrier()
    dist.destroy_process_group()


def measure(name: str, parallel: object, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}"]
        command += [__file__, "--worker", json.dumps(parallel), "--steps", str(steps), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            raise SystemExit(f"{name}: torchrun failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        processes = json.loads(out.read_text())
    worst = max(processes, key=lambda p: p["peak"])
    step_times = [max(p["times"][i] for p in processes) for i in range(1, steps)]
    return {"peak_bytes": worst["peak"], "parts": worst["parts"], "step_seconds": statistics.median(step_times)}


def planner_layout(parallel: object):  # noqa: ANN201
    from atomlab.plan import Layout as PlanLayout
    from atomlab.train.parallel import resolve_layout

    layout = resolve_layout(parallel, PROCESSES)
    dp = layout.data_parallel
    return PlanLayout(
        tp=layout.tp, dp=dp, shard=layout.dp_shard, micro_batch=BATCH // dp, grad_accum=1, checkpointing="none"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker is not None:
        worker(json.loads(options.worker), options.steps, options.out)
        return

    from rich.console import Console
    from rich.table import Table

    from atomlab.plan import Cluster, communication_per_gpu, cpu_accelerator, memory_per_gpu, speed
    from atomlab.steps import cpu_model

    args = model_args()
    cluster = Cluster(dataclasses.replace(cpu_accelerator(), gpus_per_node=PROCESSES), PROCESSES)
    rows = []
    for name, parallel in LAYOUTS.items():
        layout = planner_layout(parallel)
        predicted = memory_per_gpu(args, layout, "fp32")
        comm = communication_per_gpu(args, layout, cluster)
        predicted_step = speed(args, layout, cluster, comm, BATCH, 0).step_seconds
        measured = measure(name, parallel, options.steps)
        rows.append(
            {
                "layout": name,
                "parallel": parallel,
                "predicted_peak_mib": predicted.total / 2**20,
                "predicted_parts_mib": {k: v / 2**20 for k, v in dataclasses.asdict(predicted).items()},
                "measured_peak_mib": measured["peak_bytes"] / 2**20,
                "measured_parts_mib": {k: v / 2**20 for k, v in measured["parts"].items()},
                "memory_error": predicted.total / measured["peak_bytes"] - 1,
                "predicted_step_s": predicted_step,
                "measured_step_s": measured["step_seconds"],
            }
        )
    table = Table(title=f"planner vs measured, {PROCESSES} processes (gloo, fp32), {cpu_model()}")
    for column in ("layout", "predicted peak MiB", "measured peak MiB", "error", "predicted step s", "measured step s"):
        table.add_column(column, justify="left" if column == "layout" else "right")
    for row in rows:
        table.add_row(
            row["layout"],
            f"{row['predicted_peak_mib']:.2f}",
            f"{row['measured_peak_mib']:.2f}",
            f"{row['memory_error']:+.1%}",
            f"{row['predicted_step_s']:.3f}",
            f"{row['measured_step_s']:.3f}",
        )
    Console().print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    shape = {**SHAPE, "batch": BATCH, "processes": PROCESSES, "steps": options.steps}
    RESULTS.write_text(json.dumps({"cpu": cpu_model(), "shape": shape, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
