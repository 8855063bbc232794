"""The machine's limit that training is measured against: how fast a large square matmul runs here.

    python -m bench.peak             # prints the rate of each precision, as the benchmark records it

A matmul of two N×N matrices (N = 4096: large enough that it runs at the cores' full rate, small
enough to take about a second) is the fastest thing a CPU's math library does, so the training
FLOPs a preset reaches per second, as a share of this, say how much of the machine it uses. Timed
with every thread PyTorch would train with, in the precisions the presets train in here: fp32,
and bf16 where the hardware runs it natively (stages.hardware; elsewhere training runs fp32).
"""

from __future__ import annotations

import time

import torch

from stages.hardware import has_native_bf16

SIDE = 4096
REPEATS = 5  # the best of them: the first warms the library's caches and thread pool
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_rates(side: int = SIDE, repeats: int = REPEATS) -> dict:
    """FLOP/s of an N×N by N×N matmul in each precision (2 N³ FLOPs), the best of `repeats`, and the threads."""
    rates = {}
    native = ["fp32", "bf16"] if has_native_bf16(torch.device("cpu")) else ["fp32"]
    for precision, dtype in ((precision, DTYPES[precision]) for precision in native):
        generator = torch.Generator().manual_seed(0)
        left, right = (torch.randn(side, side, generator=generator).to(dtype) for _ in range(2))
        best = min(timed_matmul(left, right) for _ in range(repeats))
        rates[precision] = 2 * side**3 / best
    return {"matmul_side": side, "threads": torch.get_num_threads(),
            **{f"{precision}_flops_per_second": round(rate) for precision, rate in rates.items()}}


def timed_matmul(left: torch.Tensor, right: torch.Tensor) -> float:
    started = time.perf_counter()
    torch.mm(left, right)
    return time.perf_counter() - started


if __name__ == "__main__":
    peak = matmul_rates()
    for precision in (precision for precision in DTYPES if f"{precision}_flops_per_second" in peak):
        print(f"{precision}: {peak[f'{precision}_flops_per_second'] / 1e12:.3f} TFLOP/s "
              f"({peak['matmul_side']}² matmul, {peak['threads']} threads)")
