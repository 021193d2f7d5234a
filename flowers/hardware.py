"""What the hardware could do: an FP32 peak estimate (with how it was made) and a measured GEMM.

`flowers bench` states achieved GFLOP/s as a share of this peak. The estimate is arithmetic from
facts the OS reports, never a lookup of a benchmark result:

    CPU: logical cores x clock x FP32 FLOP per cycle per core (from the vector/FMA units the
         CPU flags and microarchitecture imply)
    GPU: the vendor's FP32 (non-tensor-core) figure for the named model
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

# Vendor FP32 (CUDA core) TFLOP/s; tensor cores (TF32/bf16) can exceed these.
GPU_FP32_TFLOPS = {
    "H200": 67.0, "H100 SXM": 67.0, "H100 80GB HBM3": 67.0, "H100 PCIe": 51.0, "H100": 51.0,
    "A100": 19.5, "L40S": 91.6, "L4": 30.3, "A10": 31.2, "T4": 8.1, "V100": 15.7,
    "RTX 4090": 82.6, "RTX 3090": 35.6,
}


def cpu_flops_per_cycle(flags: set[str], vendor: str, family: int) -> tuple[int, str]:
    """FP32 FLOP per cycle per core and why: 2 FMA pipes x vector lanes x 2 (multiply + add)."""
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family < 26:
            # Zen 4 executes 512-bit FMAs on two 256-bit pipes; Zen 5 (family 26) has 512-bit pipes
            return 32, "AMD Zen 4: AVX-512 on two 256-bit FMA pipes = 2 x 8 lanes x 2"
        return 64, "AVX-512: two 512-bit FMA pipes = 2 x 16 lanes x 2"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2+FMA: two 256-bit FMA pipes = 2 x 8 lanes x 2"
    if "avx" in flags:
        return 16, "AVX without FMA: 256-bit add + multiply = 8 + 8"
    return 8, "SSE: 128-bit add + multiply = 4 + 4"


def cpu_peak() -> dict[str, Any]:
    """FP32 peak GFLOP/s of this machine's CPU, with the arithmetic that produced it."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    vendor, family = info.get("vendor_id", ""), int(info.get("cpu family", "0") or 0)
    per_cycle, why = cpu_flops_per_cycle(flags, vendor, family)
    mhz, clock_source = _max_clock_mhz(info)
    cores = os.cpu_count() or 1
    gflops = cores * mhz / 1000 * per_cycle
    return {
        "fp32_gflops": round(gflops, 1),
        "method": f"{cores} cores x {mhz:.0f} MHz ({clock_source}) x {per_cycle} FP32 FLOP/cycle "
                  f"({why})",
    }


def gpu_peak(name: str) -> dict[str, Any]:
    """FP32 peak GFLOP/s of a named NVIDIA GPU, or null with the reason."""
    for key, tflops in GPU_FP32_TFLOPS.items():
        if key.lower() in name.lower():
            return {"fp32_gflops": tflops * 1000,
                    "method": f"NVIDIA's FP32 (non-tensor-core) figure for {key}: {tflops} TFLOP/s"}
    return {"fp32_gflops": None, "method": f"no FP32 figure known for GPU {name!r}"}


def peak_for(device: str) -> dict[str, Any]:
    return cpu_peak() if device == "cpu" else gpu_peak(device)


def measured_gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best of `repeats` float32 size x size matrix products through numpy's BLAS, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), np.float32)
    b = rng.random((size, size), np.float32)
    a @ b  # warm-up: threads and caches
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _max_clock_mhz(info: dict[str, str]) -> tuple[float, str]:
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(max_freq.read_text()) / 1000, "cpufreq maximum"
    except (OSError, ValueError):
        pass
    if "cpu MHz" in info:
        return float(info["cpu MHz"]), "/proc/cpuinfo nominal; a VM hides turbo"
    return 2000.0, "unknown clock, 2 GHz assumed"
