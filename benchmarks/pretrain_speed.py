"""Pretraining speed at the tiny recipe's shape, side by side: atomlab in fp32, atomlab with
train.precision = "auto" (bf16 autocast where this CPU computes bf16 faster), and nanoGPT's own
`train.py` at the same shape (4 layers x 256, 4 heads, sequences of 256, batch 16, the tiny vocabulary,
fp32, no compile), if its folder is given.

    python benchmarks/pretrain_speed.py                            # atomlab fp32 and auto
    python benchmarks/pretrain_speed.py --nanogpt /work/ext/nanoGPT # and nanoGPT (its code is not ours:
                                                                    # keep it outside the repository)
    python benchmarks/pretrain_speed.py --memory                    # also a short `atomlab run tiny`: RSS
    python benchmarks/pretrain_speed.py --full                      # also the whole default run
    python benchmarks/pretrain_speed.py --compile                   # also fp32 with train.compile

The three train in turn, `--rounds` times (interleaved, so a shared machine's load falls on all alike);
each figure is the median step time over the rounds' steps after warm-up. Achieved FLOP/s is tokens/s
times each program's own FLOP count per token (both the PaLM accounting: 6 x matmul weights plus
attention), so the models, which differ a little (atomlab: SwiGLU, grouped-query attention, RoPE;
nanoGPT: GELU MLP, learned positions), are compared on work done per second. MFU is against the fp32
matmul peak measured here. Writes benchmarks/results/pretrain_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atomlab.model import Transformer, count_parameters, flops_per_token
from atomlab.recipe import load_recipe
from atomlab.steps import cpu_model
from atomlab.train.loop import autocast_context, build_optimizer, lm_loss, model_args
from atomlab.train.parallel import speed_features
from atomlab.train.peak import measure_matmul_flops, measured_precision

RESULTS = Path(__file__).parent / "results" / "pretrain_speed.json"
TINY_VOCAB = 2056  # what the tiny recipe's tokenizer reaches (config.json of its pretrain step)


def atomlab_step_times(
    precision: str, steps: int, warmup: int, compile: bool = False
) -> tuple[list[float], int, float]:
    """Step times of atomlab's training step (the loop's loss, AdamW, clipping, autocast) at the tiny shape,
    its FLOP per token, and the first step's time (with `compile`, as train.compile does: the compile cost)."""
    recipe = load_recipe("tiny")
    train = recipe.train
    args = model_args(recipe.model, TINY_VOCAB)
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(0))
    speed_features(model, False, compile)
    device = torch.device("cpu")
    optimizer = build_optimizer(model, train, device)
    autocast = autocast_context(device, precision)
    generator = torch.Generator().manual_seed(0)
    times, first = [], 0.0
    for step in range(warmup + steps):
        tokens = torch.randint(0, args.vocab_size, (train.batch_size, args.seq_len + 1), generator=generator)
        start = time.perf_counter()
        with autocast:
            loss = lm_loss(model, tokens[:, :-1], tokens[:, 1:], "mean", train.loss_chunk_tokens, train.z_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the loop reads the loss once per step
        if step == 0:
            first = time.perf_counter() - start
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times, flops_per_token(args, count_parameters(model)["matmul"]), first


def nanogpt_step_times(folder: Path, steps: int, warmup: int, work: Path) -> tuple[list[float], int]:
    """Step times nanoGPT's train.py prints (`iter N: ... time X ms`) at the tiny shape, on random tokens."""
    recipe = load_recipe("tiny")
    data = work / "data" / "atomlab"
    if not data.is_dir():
        data.mkdir(parents=True)
        tokens = np.random.default_rng(0).integers(0, TINY_VOCAB, 2_000_000, dtype=np.uint16)
        tokens.tofile(data / "train.bin")
        tokens[:100_000].tofile(data / "val.bin")
        with open(data / "meta.pkl", "wb") as handle:
            pickle.dump({"vocab_size": TINY_VOCAB}, handle)  # nanoGPT reads its vocabulary size from here
        (work / "configurator.py").write_bytes((folder / "configurator.py").read_bytes())  # read from the cwd
    model, train = recipe.model, recipe.train
    settings = {
        "dataset": "atomlab",
        "device": "cpu",
        "dtype": "float32",
        "compile": "False",
        "n_layer": model.n_layers,
        "n_head": model.n_heads,
        "n_embd": model.d_model,
        "block_size": model.seq_len,
        "batch_size": train.batch_size,
        "gradient_accumulation_steps": 1,
        "bias": "False",
        "dropout": 0.0,
        "max_iters": warmup + steps,
        "eval_interval": 100_000,
        "eval_iters": 1,
        "log_interval": 1,
        "always_save_checkpoint": "False",
        "out_dir": str(work / "out"),
        "learning_rate": train.lr,
        "warmup_iters": 2,
    }
    command = [sys.executable, str(folder / "train.py"), *(f"--{key}={value}" for key, value in settings.items())]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if result.returncode != 0:
        raise SystemExit(f"nanoGPT train.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    logged = re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", result.stdout)
    times = [float(ms) / 1000 for step, ms in logged if int(step) >= warmup]
    # nanoGPT's own FLOP count (model.estimate_mfu): 6 N + 12 L H Q T, N its parameters without the position
    # embedding (tied token embedding, per layer 12 d^2 weights and two LayerNorms, a final LayerNorm)
    d = model.d_model
    parameters = TINY_VOCAB * d + model.n_layers * (12 * d * d + 2 * d) + d
    printed = float(re.search(r"number of parameters: ([\d.]+)M", result.stdout).group(1)) * 1e6
    assert abs(printed - parameters) < 0.01e6, (printed, parameters)  # the shape is the one asked for
    head_size = d // model.n_heads
    flops = 6 * parameters + 12 * model.n_layers * model.n_heads * head_size * model.seq_len
    return times, flops


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
    parser.add_argument("--nanogpt", type=Path, help="a folder holding nanoGPT's train.py and model.py")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per program per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also a short `atomlab run tiny`: wall time, peak RSS")
    parser.add_argument("--full", action="store_true", help="also time the whole default run")
    parser.add_argument(
        "--compile", action="store_true", help="also atomlab fp32 with train.compile (its first step: the compile)"
    )
    options = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    auto = measured_precision("cpu")
    auto_name, compiled_name = f"atomlab auto ({auto.precision})", "atomlab fp32 train.compile"
    programs = {"atomlab fp32": ("fp32", False), auto_name: (auto.precision, False)}
    if options.compile:
        programs[compiled_name] = ("fp32", True)
    first_step: dict[str, float] = {}  # the first round's: compiling, where train.compile is on
    times: dict[str, list[float]] = {name: [] for name in programs}
    flops: dict[str, int] = {}
    if options.nanogpt:
        times["nanoGPT train.py fp32"] = []
    peaks = []
    with tempfile.TemporaryDirectory() as work:
        for _ in range(options.rounds):
            peaks.append(measure_matmul_flops(1024))
            for name, (precision, compile) in programs.items():
                measured, flops[name], first = atomlab_step_times(precision, options.steps, options.warmup, compile)
                times[name] += measured
                first_step.setdefault(name, first)
            if options.nanogpt:
                measured, flops["nanoGPT train.py fp32"] = nanogpt_step_times(
                    options.nanogpt, options.steps, options.warmup, Path(work)
                )
                times["nanoGPT train.py fp32"] += measured
    peak = max(peaks)
    recipe = load_recipe("tiny")
    tokens_per_step = recipe.train.batch_size * recipe.model.seq_len
    rows = {}
    for name, measured in times.items():
        tokens_per_s = tokens_per_step / statistics.median(measured)
        achieved = tokens_per_s * flops[name]
        rows[name] = {
            "median_step_s": round(statistics.median(measured), 4),
            "steps_timed": len(measured),
            "tokens_per_s": round(tokens_per_s, 1),
            "flops_per_token": flops[name],
            "achieved_gflops": round(achieved / 1e9, 2),
            "mfu_vs_fp32_peak": round(achieved / peak, 4),
        }
        if name in first_step:
            rows[name]["first_step_s"] = round(first_step[name], 2)
    baseline = rows.get("nanoGPT train.py fp32")
    for row in rows.values():
        row["flops_ratio_vs_nanogpt"] = (
            round(row["achieved_gflops"] / baseline["achieved_gflops"], 3) if baseline else None
        )
    fp32_row = rows["atomlab fp32"]
    results = {
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "matmul_fp32_n1024_best_gflops": round(peak / 1e9, 1),
        "precision_auto": auto.record(),
        "tiny_shape": rows,
        "auto_speedup_vs_fp32": round(rows[auto_name]["tokens_per_s"] / fp32_row["tokens_per_s"], 3),
    }
    if options.compile:  # per step after the compile; first_step_s is what it costs once per process
        results["compile_speedup_vs_fp32"] = round(rows[compiled_name]["tokens_per_s"] / fp32_row["tokens_per_s"], 3)
    if options.memory or options.full:
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
    print(f"\n{cpu_model()}, {torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print(
        "| program | tokens/s | FLOP/token | achieved GFLOP/s | MFU | vs nanoGPT | first step s |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name, row in rows.items():
        ratio = f"{row['flops_ratio_vs_nanogpt']:.2f}x" if row["flops_ratio_vs_nanogpt"] else "-"
        first = f"{row['first_step_s']:.1f}" if "first_step_s" in row else "-"
        print(
            f"| {name} | {row['tokens_per_s']:,.0f} | {row['flops_per_token'] / 1e6:.2f}M | "
            f"{row['achieved_gflops']:.1f} | {row['mfu_vs_fp32_peak']:.1%} | {ratio} | {first} |"
        )


if __name__ == "__main__":
    main()
