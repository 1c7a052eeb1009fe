"""Metrics to `metrics.jsonl` (one JSON object per step), optionally mirrored to TensorBoard or
Weights & Biases (offline mode). Both are optional extras, imported only when asked for."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError


class MetricsLogger:
    def __init__(
        self,
        folder: Path,
        *,
        truncate_after: int,
        tensorboard: bool = False,
        wandb: bool = False,
        run_name: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.path = folder / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if self.path.exists():  # a resumed run keeps what happened up to its checkpoint
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill
                if record.get("step", 0) <= truncate_after:
                    self.records.append(record)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
        self.handle = open(self.path, "a", encoding="utf-8")
        self.tensorboard = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise AtomlabError(
                    "train.tensorboard: needs the tensorboard package: pip install 'atomlab[tensorboard]'"
                ) from None
            self.tensorboard = SummaryWriter(str(folder / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise AtomlabError("train.wandb: needs the wandb package: pip install 'atomlab[wandb]'") from None
            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb_module.init(project="atomlab", name=run_name, dir=str(folder), config=config or {})

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.handle.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def flush(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.flush()
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def last_eval(self) -> dict[str, Any]:
        return next((r for r in reversed(self.records) if "val_bpb" in r), {})

    def last_sample(self) -> str:
        return next((r["sample"] for r in reversed(self.records) if "sample" in r), "")


class Throughput:
    """Tokens/s and MFU over windows of at least 2 s of training (the last step closes one too)."""

    WINDOW_S = 2.0

    def __init__(self, flops_per_token: int, meter: Any) -> None:
        self.flops_per_token, self.meter = flops_per_token, meter  # meter: atomlab.train.peak.MFUMeter
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.tokens_per_second = 0.0
        self.mfu: float | None = 0.0
        self._reported = False

    def add(self, tokens: int, last: bool = False) -> None:
        self.window_tokens += tokens
        elapsed = time.perf_counter() - self.window_start
        if elapsed > self.WINDOW_S or last:
            self.tokens_per_second = self.window_tokens / elapsed
            self.mfu = self.meter.mfu(self.tokens_per_second * self.flops_per_token)
            self.window_start, self.window_tokens = time.perf_counter(), 0

    def problem_to_report(self) -> bool:
        """True once, the first time the MFU could not be reported."""
        if self.meter.problem and not self._reported:
            self._reported = True
            return True
        return False

    def record(self) -> dict[str, Any]:
        return {
            "tokens_per_s": round(self.tokens_per_second, 1),
            "mfu": None if self.mfu is None else round(self.mfu, 4),
        }

    def summary(self) -> dict[str, Any]:
        figures = {**self.record(), "peak_flops": self.meter.peak, "peak_precision": self.meter.precision}
        if self.meter.problem:
            figures["mfu_problem"] = self.meter.problem
        return figures


def percent(share: float | None) -> str:
    """A share as a percentage; None (an MFU the run could not measure, see atomlab.train.peak) as n/a."""
    return "n/a" if share is None else f"{share:.1%}"
