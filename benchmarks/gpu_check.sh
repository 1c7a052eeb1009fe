#!/usr/bin/env bash
# One-GPU check of the GPU recipes, in at most 8 minutes on one H100/H200-class GPU: atomlab pretrains
#   1. recipes/gpu-125m.toml (~135M parameters, 32 x 1024 tokens per step) for 300 steps,
#   2. recipes/gpu-1b.toml   (~1.03B parameters, 2 x 8 x 2048 tokens per step) for 120 steps,
#   3. recipes/gpu-125m.toml again for 100 steps under torchrun with train.parallel = "fsdp" (one process),
# each with bf16 autocast (fp32 master weights) and torch.compile, and prints for each its tokens/s, MFU
# and peak GPU memory beside what `atomlab plan` predicts for it (one GPU of this kind).
#
#   bash benchmarks/gpu_check.sh                          # from anywhere in the repository
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_check.sh
#   KEEP_OUTPUT=1 bash benchmarks/gpu_check.sh            # keep the run folder (else deleted on success)
#
# The three share one prepare-data and tokenizer step (the same data settings, so the same step hashes).
# Budget (H100, estimated from `atomlab plan` at 40% MFU): data and a 32k tokenizer ~1 min on the CPU;
# 125M 300 x 32k tokens ~25 s + compile ~1 min; 1B 120 x 32k tokens ~70 s + compile ~1 min; FSDP run
# ~1 min: ~6 minutes in all. Figures are medians over the second half of each run's steps.
set -euo pipefail

cd "$(dirname "$0")/.."  # the repository root: atomlab imports from here even when not installed

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found; this check needs an NVIDIA GPU and its driver" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PLAN_GPU=$("$PYTHON" - <<'EOF'
import sys

import torch

import atomlab

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no GPU (a CPU build of torch?); install a CUDA build")
name = torch.cuda.get_device_name()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), atomlab {atomlab.__version__}, {name}", file=sys.stderr)
# the planner's device kind nearest to this GPU (its peak and memory)
print(next((kind for key, kind in (("H200", "h200"), ("B200", "b200"), ("A100", "a100-80g")) if key in name), "h100"))
EOF
)
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  echo "gpu_check: warning: no C compiler (cc/gcc) found; torch.compile's Triton backend needs one" >&2
fi

OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/atomlab-gpu-check.XXXXXX")
cleanup() {
  local status=$?
  if [ "$status" -eq 0 ] && [ "${KEEP_OUTPUT:-0}" != 1 ]; then
    rm -rf "$OUT_DIR"
  else
    echo "gpu_check: run folder kept: $OUT_DIR" >&2
  fi
}
trap cleanup EXIT

# settings of a short check: no checkpoint, one validation pass and one sample at the end
short() {
  echo "train.max_steps=$1" "train.warmup_steps=$(($1 / 10))" "train.eval_every=$1" "train.sample_every=$1" \
    "train.checkpoint_every=100000" "train.eval_batches=2"
}

SECONDS=0
# shellcheck disable=SC2046  # word splitting of short's settings is intended
"$PYTHON" -m atomlab.cli pretrain recipes/gpu-125m.toml "out_dir=$OUT_DIR/125m" $(short 300)
mkdir -p "$OUT_DIR/1b" "$OUT_DIR/fsdp/runs"  # the other runs reuse the 125M run's data and tokenizer steps
cp -r "$OUT_DIR"/125m/prepare-data-* "$OUT_DIR"/125m/tokenizer-* "$OUT_DIR/1b/"
cp -r "$OUT_DIR"/125m/prepare-data-* "$OUT_DIR"/125m/tokenizer-* "$OUT_DIR/fsdp/runs/"
# shellcheck disable=SC2046
"$PYTHON" -m atomlab.cli pretrain recipes/gpu-1b.toml "out_dir=$OUT_DIR/1b" $(short 120)
# shellcheck disable=SC2046
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m atomlab.cli pretrain recipes/gpu-125m.toml \
  "out_dir=$OUT_DIR/fsdp/runs" train.parallel=fsdp $(short 100)
WALL=$SECONDS

"$PYTHON" - "$OUT_DIR" "$WALL" "$PLAN_GPU" <<'EOF'
import json
import statistics
import subprocess
import sys
from pathlib import Path

out, wall, gpu = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def planned(recipe: str) -> dict:
    """`atomlab plan`'s prediction for the recipe on one GPU of this kind."""
    command = [sys.executable, "-m", "atomlab.cli", "plan", "--recipe", recipe, "--gpu", gpu, "--gpus", "1", "--json"]
    plan = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    memory = plan["memory_gib"][plan["layout"]["checkpointing"]]["total"]
    return {"tokens_per_s": plan["speed"]["tokens_per_second"], "mfu": plan["speed"]["mfu"], "memory_gib": memory}


print(f"gpu_check: whole command {wall} s")
print(f"{'run':<22}{'parameters':>12}{'tokens/s':>12}{'plan':>12}{'MFU':>8}{'plan':>7}{'peak GiB':>10}{'plan':>8}")
for name, folder, recipe in (
    ("125M, compile, bf16", out / "125m", "recipes/gpu-125m.toml"),
    ("1B, compile, bf16", out / "1b", "recipes/gpu-1b.toml"),
    ("125M, torchrun + fsdp", out / "fsdp" / "runs", "recipes/gpu-125m.toml"),
):
    found = [p for p in folder.glob("pretrain-*") if not p.name.endswith(".partial")]
    if len(found) != 1:
        sys.exit(f"gpu_check: expected one finished pretrain folder in {folder}, found {[p.name for p in found]}")
    summary = json.loads((found[0] / "train_summary.json").read_text())
    records = [json.loads(line) for line in (found[0] / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # the second half of the steps: compilation and warm-up long done
    late = [r for r in records if r["step"] > summary["steps"] // 2 and r.get("tokens_per_s")]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in late)
    mfus = [r["mfu"] for r in late if r.get("mfu") is not None]
    mfu = f"{statistics.median(mfus):.1%}" if mfus else "n/a"
    plan = planned(recipe)
    print(
        f"{name:<22}{summary['parameters']['total'] / 1e6:>11.0f}M{tokens_per_s:>12,.0f}{plan['tokens_per_s']:>12,.0f}"
        f"{mfu:>8}{plan['mfu']:>7.0%}{summary['peak_memory_gib']:>10.1f}{plan['memory_gib']:>8.1f}"
        f"   ({summary['precision']}, parallel {summary['parallel']}, final loss {summary['final_train_loss']})"
    )
    if summary.get("mfu_problem"):
        print(f"  warning: {summary['mfu_problem']}")
EOF
