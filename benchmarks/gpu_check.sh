#!/usr/bin/env bash
# One-GPU speed check: atomlab pretrains a ~150M-parameter model (12 layers x 1024 wide, grouped-query
# attention, sequences of 1024 tokens) for 300 steps with bf16 autocast and torch.compile, then prints
# tokens/s and MFU on one line. Under 5 minutes on one H100/H200, data preparation and compilation included.
#
#   bash benchmarks/gpu_check.sh                          # from the repository root
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_check.sh
#   KEEP_OUTPUT=1 bash benchmarks/gpu_check.sh            # keep the run folder (else deleted on success)
#
# Sizes: 12 x 1024 with 16 heads (4 key/value heads) and the default SwiGLU width holds 131.8M
# parameters outside the embedding; the tied embedding adds 1024 x the vocabulary the tokenizer
# reaches (at most 32,000), so 132M-165M in all. (12 x 768 would be ~100M: under the 125M aimed at.)
# 300 steps x 32 sequences x 1024 tokens = 9.8M tokens, about 1.1e16 training FLOPs: ~30 s at 40% MFU.
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
GPU_NAME=$("$PYTHON" - <<'EOF'
import sys

import torch

import atomlab

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no GPU (a CPU build of torch?); install a CUDA build")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), atomlab {atomlab.__version__}", file=sys.stderr)
print(torch.cuda.get_device_name())
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

SECONDS=0
"$PYTHON" -m atomlab.cli pretrain tiny \
  "out_dir=$OUT_DIR/runs" \
  model.d_model=1024 model.n_layers=12 model.n_heads=16 model.n_kv_heads=4 model.seq_len=1024 \
  tokenizer.vocab_size=32000 \
  train.batch_size=32 train.max_steps=300 train.warmup_steps=30 \
  train.eval_every=300 train.checkpoint_every=1000 train.sample_every=300 \
  train.device=cuda train.compile=true
WALL=$SECONDS

"$PYTHON" - "$OUT_DIR/runs" "$WALL" "$GPU_NAME" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

runs, wall, gpu = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
folders = [p for p in runs.glob("pretrain-*") if not p.name.endswith(".partial")]
if len(folders) != 1:
    sys.exit(f"gpu_check: expected one finished pretrain folder in {runs}, found {[p.name for p in folders]}")
summary = json.loads((folders[0] / "train_summary.json").read_text())
parameters = summary["parameters"]
total = parameters["total"] if isinstance(parameters, dict) else parameters

# train_summary.json holds the last measuring window; the median over the second half of the steps
# (compilation and warm-up long done) is the steadier figure.
steady = ""
metrics = folders[0] / "metrics.jsonl"
if metrics.exists():
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    late = [r for r in records if r.get("step", 0) > summary["steps"] // 2 and r.get("tokens_per_s")]
    if late:
        median_tps = statistics.median(r["tokens_per_s"] for r in late)
        median_mfu = statistics.median(r.get("mfu", 0.0) for r in late)
        steady = f" (median of the second half: {median_tps:,.0f} tokens/s, MFU {median_mfu:.1%})"
print(
    f"gpu_check: {gpu}, {total:,} parameters, {summary['steps']} steps, "
    f"{summary['tokens']:,} tokens, whole command {wall} s: "
    f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%}{steady}"
)
EOF
