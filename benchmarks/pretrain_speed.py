"""Pretraining speed, MFU and memory of the tiny recipe on this machine, measured side by side.

    python benchmarks/pretrain_speed.py          # matmul peak + training step speed + memory of a short run
    python benchmarks/pretrain_speed.py --full   # also the whole default run: wall time, peak memory, bits/byte

Writes benchmarks/results/pretrain_speed.json. Timings are medians over repeated measurements
in one process; MFU is the training FLOPs actually done per second over the fp32 matmul peak
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from atomlab.model import Transformer, count_parameters, flops_per_token
from atomlab.recipe import load_recipe
from atomlab.train.loop import build_optimizer, model_args
from atomlab.train.peak import measure_matmul_flops

RESULTS = Path(__file__).parent / "results" / "pretrain_speed.json"


def matmul_peak(repeats: int = 5) -> dict[str, float]:
    samples = [measure_matmul_flops(1024) for _ in range(repeats)]
    return {"best_gflops": max(samples) / 1e9, "median_gflops": statistics.median(samples) / 1e9}


def training_speed(recipe_name: str, steps: int, warmup: int) -> dict[str, float]:
    recipe = load_recipe(recipe_name)
    args = model_args(recipe.model, recipe.tokenizer.vocab_size)
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, recipe.train, torch.device("cpu"))
    batch = recipe.train.batch_size
    tokens = torch.randint(0, args.vocab_size, (batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    params = count_parameters(model)
    step_time = statistics.median(times)
    return {
        "parameters": params["total"],
        "flops_per_token": flops_per_token(args, params["matmul"]),
        "tokens_per_step": batch * args.seq_len,
        "median_step_s": step_time,
        "tokens_per_s": batch * args.seq_len / step_time,
    }


def run_and_measure(arguments: list[str]) -> dict[str, float]:
    """Run `atomlab run ...` in a fresh folder; its wall time and peak resident memory."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "atomlab.cli", "run", *arguments], cwd=folder, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"atomlab run failed:\n{result.stderr}")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        metrics = json.loads(next(Path(folder, "runs").glob("release-*/metrics.json")).read_text())
        timings = json.loads(next(Path(folder, "runs").glob("release-*/timings.json")).read_text())
    speed = timings["steps"]["pretrain"]["speed"]  # the bundle's machine record holds the speed figures
    return {
        "wall_s": wall,
        "peak_rss_mib": peak_kib / 1024,
        "val_bits_per_byte": metrics["stages"]["pretrain"]["val_bits_per_byte"],
        "tokens_per_s": speed["tokens_per_s"],
        "mfu": speed["mfu"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also time the whole default run (about 8 minutes)")
    parser.add_argument("--steps", type=int, default=20)
    options = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    peak_before = matmul_peak()
    speed = training_speed("tiny", options.steps, warmup=3)
    peak_after = matmul_peak()
    peak = max(peak_before["best_gflops"], peak_after["best_gflops"])
    achieved = speed["tokens_per_s"] * speed["flops_per_token"] / 1e9
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "matmul_fp32_n1024": {
            "best_gflops": round(peak, 1),
            "median_gflops": round(statistics.median([peak_before["median_gflops"], peak_after["median_gflops"]]), 1),
        },
        "tiny_pretrain": {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in speed.items()},
            "achieved_gflops": round(achieved, 1),
            "mfu": round(achieved / peak, 4),
        },
        "goals": {"mfu": 0.5, "peak_memory_mib": 2048},
    }
    short = [
        "tiny",
        "train.max_steps=40",
        "train.warmup_steps=5",
        "train.eval_every=20",
        "train.checkpoint_every=20",
        "train.sample_every=40",
    ]
    results["short_run_memory"] = run_and_measure(short)
    if options.full:
        results["full_default_run"] = run_and_measure(["tiny"])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
