"""The device's peak FLOP/s, the denominator of MFU: measured on CPU, looked up on GPU."""

from __future__ import annotations

import time

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


def measure_matmul_flops(
    n: int = 1024, repeats: int = 8, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> float:
    """Best-of-repeats FLOP/s of an n x n matmul with the current thread settings."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak
        return measure_matmul_flops(8192, dtype=torch.bfloat16, device="cuda")
    return measure_matmul_flops()
