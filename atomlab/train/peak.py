"""The device's peak FLOP/s, the denominator of MFU, and the precision that is fastest on it.

On CPU the peak is measured (best of several repeats after warm-up, since a shared machine's load only
ever makes a matmul slower); on GPU it is the data sheet's dense bf16 figure, or measured for fp32 and
for GPUs not in the table. `choose_precision` measures bf16 and fp32 matmuls at a transformer-like shape
and picks bf16 only where it is clearly faster: CPUs with AVX512-BF16 or AMX compute it natively (about
6x fp32), others emulate it (10-100x slower), so the answer is measured, not assumed.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s).
GPU_PEAKS = {
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_MARGIN = 1.2  # bf16 must beat fp32 by this factor: a near tie is noise, and fp32 is the exact one


def measure_matmul_flops(
    n: int = 1024,
    repeats: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    shape: tuple[int, int, int] | None = None,
    give_up_after: float = float("inf"),
) -> float:
    """Best-of-repeats FLOP/s of an (m x k) @ (k x n) matmul (n x n x n unless `shape` gives m, k, n) with the
    current thread settings, after two warm-up calls. Stops early once one call took `give_up_after` seconds
    (an emulated dtype: its first calls already tell it is slow)."""
    m, k, n = shape or (n, n, n)
    # drawn from a generator of its own: a measurement repeated when a load spike spoils it (MFUMeter) must not
    # move the global RNG, whose state the checkpoints save and `atomlab reproduce` compares
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, dtype=dtype, device=device, generator=generator)
    b = torch.randn(k, n, dtype=dtype, device=device, generator=generator)
    best = float("inf")
    for attempt in range(2 + repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if attempt >= 2 or elapsed > give_up_after:  # warm-up calls count only when they show a slow dtype
            best = min(best, elapsed)
        if elapsed > give_up_after:
            break
    return 2 * m * k * n / best


def probe_shape(device: torch.device) -> tuple[int, int, int]:
    """A matmul like a small transformer's MLP on this device: (tokens x width) @ (width x 3 width)."""
    return (4096, 2048, 6144) if device.type == "cuda" else (512, 256, 768)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" or "bf16"
    fp32_flops: float  # measured matmul FLOP/s at the probe shape
    bf16_flops: float

    def record(self) -> dict[str, float | str]:
        return {
            "precision": self.precision,
            "fp32_gflops": round(self.fp32_flops / 1e9, 2),
            "bf16_gflops": round(self.bf16_flops / 1e9, 2),
        }


def choose_precision(fp32_flops: float, bf16_flops: float) -> PrecisionChoice:
    """bf16 autocast where its matmuls are measurably faster than fp32's, fp32 elsewhere."""
    precision = "bf16" if bf16_flops >= BF16_MARGIN * fp32_flops else "fp32"
    return PrecisionChoice(precision, fp32_flops, bf16_flops)


@functools.cache
def measured_precision(device_name: str) -> PrecisionChoice:
    """`train.precision = "auto"` resolved on this device (measured once per process: the step hash and the
    training loop see the same answer)."""
    device = torch.device(device_name)
    shape = probe_shape(device)
    fp32 = measure_matmul_flops(shape=shape, repeats=5, dtype=torch.float32, device=str(device))
    # bf16 far slower than fp32 is clear from one call: stop once a call takes 5x fp32's best time
    slow = 5 * 2 * shape[0] * shape[1] * shape[2] / fp32
    bf16 = measure_matmul_flops(shape=shape, repeats=5, dtype=torch.bfloat16, device=str(device), give_up_after=slow)
    return choose_precision(fp32, bf16)


def resolve_precision(setting: str, device: torch.device) -> str:
    """train.precision ("auto", "fp32", "bf16") as it runs on `device`."""
    if setting != "auto":
        return setting
    return measured_precision(str(device)).precision


def device_peak_flops(device: torch.device, precision: str = "fp32", repeats: int = 8) -> float:
    """Peak matmul FLOP/s of one device in `precision`: the data sheet's for a known GPU in bf16, else measured
    (n = 1024 on CPU, 8192 on GPU), best of `repeats` after warm-up."""
    dtype = DTYPES[precision]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if precision == "bf16":
            for key, peak in GPU_PEAKS.items():
                if key in name:
                    return peak
        return measure_matmul_flops(8192, repeats=repeats, dtype=dtype, device=str(device))
    return measure_matmul_flops(1024, repeats=repeats, dtype=dtype)


class MFUMeter:
    """Model FLOPs utilisation against a measured peak. A figure above 100% cannot be true: it means the
    peak was measured low (a load spike on a shared CPU), so the peak is measured again, and if the figure
    still exceeds 100% it is reported as a measurement problem (None) instead of printed."""

    def __init__(self, device: torch.device, precision: str, processes: int) -> None:
        self.device, self.precision, self.processes = device, precision, processes
        self.peak = device_peak_flops(device, precision) * processes
        self.problem = ""

    def mfu(self, flops_per_second: float) -> float | None:
        if flops_per_second <= self.peak:
            return flops_per_second / self.peak
        if self.device.type == "cpu":  # remeasure: the peak is the best this machine has shown
            self.peak = max(self.peak, device_peak_flops(self.device, self.precision) * self.processes)
            if flops_per_second <= self.peak:
                return flops_per_second / self.peak
        self.problem = (
            f"MFU above 100% ({flops_per_second / 1e9:.1f} GFLOP/s achieved, {self.peak / 1e9:.1f} GFLOP/s "
            f"measured peak in {self.precision}): the peak measurement is wrong, MFU not reported"
        )
        return None
