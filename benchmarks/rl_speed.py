"""RL rollout speed: tokens/s of GRPO rollouts through the generation engine, and the time of one
whole GRPO step (rollouts, then the update), on the arithmetic environment.

    python benchmarks/rl_speed.py --bundle runs/release-X       # a trained bundle (the tiny model, say)
    python benchmarks/rl_speed.py --bundle runs/sft-X --tokenizer runs/tokenizer-X/tokenizer.json

Each configuration (prompts x samples per prompt) runs `--repeats` times after a warm-up; the
figures are medians. Writes benchmarks/results/rl_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from atomlab.chat_format import ChatFormat
from atomlab.infer.engine import load_model
from atomlab.posttrain.rl import GRPO
from atomlab.recipe import validate_recipe
from atomlab.tokenizer import load_tokenizer
from atomlab.train.distributed import SINGLE_PROCESS
from atomlab.train.loop import Run, build_optimizer

RESULTS = Path(__file__).parent / "results" / "rl_speed.json"
CONFIGS = ((16, 8), (32, 8), (64, 8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="a release bundle or a step folder with model.safetensors")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the bundle's)")
    parser.add_argument("--environment", default="arithmetic")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.bundle)
    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else folder / "tokenizer.json")
    model = load_model(folder)
    device = torch.device("cpu")
    rows = []
    for prompts, samples in CONFIGS:
        rl = {"environments": [args.environment], "batch_size": prompts, "group_size": samples}
        recipe = validate_recipe({"rl": {**rl, "max_tokens": args.max_tokens, "lr": 1e-9}})
        # the rl step's own objective (its defaults: clip 0.2, no KL, one update per batch), as fit() calls it
        grpo = GRPO(recipe, ChatFormat.from_folder(folder, tokenizer))  # the bundle's template and stops
        grpo.setup(model, tokenizer, device, SINGLE_PROCESS, recipe.seed)
        optimizer = build_optimizer(model, recipe.rl, device)  # lr 1e-9: the update's cost, not its effect
        run = Run(model, model, recipe.rl, device, nullcontext(), SINGLE_PROCESS)
        rollout_rates, step_times, rewards = [], [], []
        for repeat in range(args.repeats + 1):
            began = time.perf_counter()
            record = grpo.backward(repeat, 0, run)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = time.perf_counter()
            if repeat:  # the first is a warm-up
                rollout_rates.append(record["rollout_tokens_per_s"])
                step_times.append(done - began)
                rewards.append(record["reward"])
        row = {
            "prompts": prompts,
            "samples_per_prompt": samples,
            "rollouts": prompts * samples,
            "rollout_tokens_per_s": round(statistics.median(rollout_rates), 1),
            "grpo_step_s": round(statistics.median(step_times), 3),
            "mean_reward": round(statistics.mean(rewards), 3),
        }
        rows.append(row)
        print(
            f"{prompts:>3} prompts x {samples} samples: rollouts {row['rollout_tokens_per_s']:>9,.0f} reply tokens/s, "
            f"whole GRPO step {row['grpo_step_s']:.2f} s (mean reward {row['mean_reward']:.2f})"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "bundle": str(folder),
                "environment": args.environment,
                "max_tokens": args.max_tokens,
                "threads": torch.get_num_threads(),
                "machine": platform.platform(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
