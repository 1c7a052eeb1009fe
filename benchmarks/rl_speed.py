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
from pathlib import Path

import numpy as np
import torch

from atomlab.envs import load_environment
from atomlab.envs.rollout import engine_responder, run_episodes
from atomlab.infer.engine import Engine, load_model
from atomlab.posttrain.rl import group_advantages, grpo_update, pack_rollouts
from atomlab.recipe import RLConfig
from atomlab.tokenizer import PAD, load_tokenizer

RESULTS = Path(__file__).parent / "results" / "rl_speed.json"
CONFIGS = ((16, 8), (32, 8), (64, 8))
UPDATE = RLConfig()  # the rl step's defaults: clip 0.2, no KL, one update per batch


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
    env = load_environment(args.environment)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)  # the update's cost, not its effect
    pad = tokenizer.token_to_id(PAD)
    rows = []
    for prompts, samples in CONFIGS:
        rollout_rates, step_times, rewards = [], [], []
        for repeat in range(args.repeats + 1):
            tasks = env.tasks(seed=10_000 + repeat, count=prompts)
            began = time.perf_counter()
            model.eval()
            respond = engine_responder(Engine(model, tokenizer, torch.device("cpu")), args.max_tokens, 1.0, repeat)
            with torch.no_grad():
                rollouts = run_episodes(env, tasks, respond, samples=samples)
            rolled = time.perf_counter()
            inputs, targets, mask = pack_rollouts(rollouts, tokenizer, model.args.seq_len, pad)
            reward = np.array([r.reward for r in rollouts]).reshape(prompts, samples)
            advantages, _ = group_advantages(reward)
            model.train()
            keep = torch.ones(len(inputs), dtype=torch.bool)
            advantage = torch.from_numpy(advantages.reshape(-1, 1)).float()
            grpo_update(model, None, optimizer, inputs[keep], targets[keep], mask[keep], advantage, UPDATE)
            done = time.perf_counter()
            if repeat:  # the first is a warm-up
                rollout_rates.append(float(mask.sum()) / (rolled - began))
                step_times.append(done - began)
                rewards.append(float(reward.mean()))
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
                "environment": env.id,
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
