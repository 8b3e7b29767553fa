"""Shared measuring tools for the benchmarks: matmul peaks, FLOP counts, timed loops."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from medfound.device import native_bf16


def matmul_peak_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained GFLOP/s of a square matmul in ``dtype``: the machine's practical ceiling.

    The side is ``n`` unless one product would take over a quarter of ``seconds`` (timed at 256 and
    scaled by the cube): a dtype the machine only emulates (bf16 on an AVX2 CPU, about 0.3 GFLOP/s) is
    then measured in seconds instead of minutes."""
    probe = torch.randn(256, 256, device=device).to(dtype)
    torch.mm(probe, probe)
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(probe, probe)
    _sync(device)
    one = time.perf_counter() - t0
    while n > 256 and one * (n / 256) ** 3 > seconds / 4:
        n //= 2
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def count_flops(fn: Callable[[], None]) -> float:
    """FLOPs of one call of ``fn`` (forward and backward), by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: str = "cpu") -> float:
    """Seconds per call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows: timings on shared
    VMs differ by host, and the name tells two hosts apart."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a benchmark ran on: torch, its thread count, the CPU model, its vector extension as torch
    sees it (AVX2 or AVX512: the same model name covers both on shared VMs), whether it computes bf16
    natively (AMX or AVX512-BF16: ``--precision auto`` then picks bf16) and the GPU if there is one."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16_native": native_bf16(torch.device("cpu"))}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mean_ms(fn: Callable[[], None], repeats: int) -> float:
    """Milliseconds per call of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000
