"""What the hardware could do: an FP32 peak estimate (with how it was made) and a measured GEMM.

`flowers bench` states achieved GFLOP/s as a share of this peak. The estimate is arithmetic from
facts the OS reports, never a lookup of a benchmark result:

    CPU: physical cores x clock x FP32 FLOP per cycle per core (from the vector/FMA units the
         CPU flags and microarchitecture imply; the method says when the FMA-unit count is assumed)
    GPU: the vendor's FP32 (non-tensor-core) figure for the model nvidia-smi names, matched by
         whole words, the longest (most specific) table entry winning
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from flowers.metrics import time_calls

# Vendor FP32 (CUDA core) TFLOP/s from NVIDIA's data sheets; tensor cores (TF32/bf16) can exceed
# these. Keys are matched as whole words of the nvidia-smi name ("NVIDIA H100 80GB HBM3" is the
# SXM5 board); a bare family name ("H100") gets its lowest variant, so a share of peak is never
# flattered by a guess.
GPU_FP32_TFLOPS = {
    "H200": 67.0, "H200 NVL": 60.0,
    "H100": 51.0, "H100 PCIe": 51.0, "H100 SXM": 67.0, "H100 SXM5": 67.0, "H100 80GB HBM3": 67.0,
    "H100 NVL": 60.0,
    "A100": 19.5,
    "L40S": 91.6, "L40": 90.5, "L4": 30.3, "A10": 31.2, "T4": 8.1,
    "V100": 14.0, "V100 PCIE": 14.0, "V100 SXM2": 15.7,
    "RTX 4090": 82.6, "RTX 3090": 35.6,
}


def cpu_flops_per_cycle(flags: set[str], vendor: str, family: int,
                        model: int = 0) -> tuple[int, str, bool]:
    """FP32 FLOP per cycle per core, why, and whether the FMA-unit count is an assumption.

    FLOP per cycle = FMA units x vector lanes x 2 (multiply + add). The OS reports the vector
    width (CPU flags) but not how many FMA units a core has; where the vendor and family do not
    settle it, two are assumed and the result says so.
    """
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family < 26:
            # Zen 4 executes 512-bit FMAs on two 256-bit pipes; Zen 5 (family 26) has 512-bit pipes
            return 32, "AMD Zen 4: AVX-512 on two 256-bit FMA pipes = 2 x 8 lanes x 2", False
        if vendor == "AuthenticAMD":
            return 64, "AMD Zen 5: two 512-bit FMA pipes = 2 x 16 lanes x 2", False
        return 64, ("AVX-512: two 512-bit FMA units = 2 x 16 lanes x 2; ASSUMED: the OS does not "
                    "report the FMA-unit count, and some Xeon Bronze/Silver/Gold parts and client "
                    "cores have one (half this peak)"), True
    if "avx2" in flags and "fma" in flags:
        if vendor == "AuthenticAMD" and family == 23 and model < 0x30:
            # Virtual machines report QEMU's generic "EPYC" model (family 23, model 1) on any Zen
            # host: this project's 2-core VM measured a 184 GFLOP/s GEMM, over twice the Zen 1 peak.
            return 32, ("AVX2+FMA: two 256-bit FMA pipes = 2 x 8 lanes x 2; ASSUMED: family 23 "
                        f"model {model} is Zen/Zen+ (two 128-bit pipes, half this peak) or a "
                        "virtual machine's generic EPYC model on a newer host"), True
        if vendor in ("GenuineIntel", "AuthenticAMD"):
            # Intel Haswell and later big cores, AMD Zen 2 and later: two 256-bit FMA pipes
            return 32, "AVX2+FMA: two 256-bit FMA pipes = 2 x 8 lanes x 2", False
        return 32, ("AVX2+FMA: two 256-bit FMA pipes = 2 x 8 lanes x 2; ASSUMED: unknown vendor "
                    f"{vendor or '?'}, FMA-unit count not reported"), True
    if "avx" in flags:
        return 16, "AVX without FMA: 256-bit add + multiply = 8 + 8", False
    return 8, "SSE: 128-bit add + multiply = 4 + 4", False


def physical_cores() -> tuple[int, str]:
    """Physical cores (hyper-threads share one core's FMA units) and where the count came from."""
    import psutil

    cores = psutil.cpu_count(logical=False)
    if cores:
        return cores, "physical cores"
    return os.cpu_count() or 1, "logical cores (physical count unavailable)"


def cpu_peak() -> dict[str, Any]:
    """FP32 peak GFLOP/s of this machine's CPU, with the arithmetic that produced it."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    vendor = info.get("vendor_id", "")
    family, model = int(info.get("cpu family", "0") or 0), int(info.get("model", "0") or 0)
    per_cycle, why, assumed = cpu_flops_per_cycle(flags, vendor, family, model)
    mhz, clock_source = _max_clock_mhz(info)
    cores, cores_source = physical_cores()
    gflops = cores * mhz / 1000 * per_cycle
    bf16_per_cycle, bf16_why = cpu_bf16_flops_per_cycle(flags)
    return {
        "fp32_gflops": round(gflops, 1),
        "fma_units_assumed": assumed,
        "method": f"{cores} {cores_source} x {mhz:.0f} MHz ({clock_source}) x {per_cycle} FP32 "
                  f"FLOP/cycle ({why})",
        "native_bf16": bf16_per_cycle is not None,
        "bf16_gflops": (round(cores * mhz / 1000 * bf16_per_cycle, 1)
                        if bf16_per_cycle is not None else None),
        "bf16_method": (f"{cores} {cores_source} x {mhz:.0f} MHz x {bf16_per_cycle} bf16 "
                        f"FLOP/cycle ({bf16_why})" if bf16_per_cycle is not None else bf16_why),
    }


def cpu_bf16_flops_per_cycle(flags: set[str]) -> tuple[int | None, str]:
    """bf16 FLOP per cycle per core from the CPU's native bf16 units, or None and why not.

    AMX-BF16: one TMUL per core multiplies 16x32 by 32x16 bf16 tiles (16,384 FLOP) every 16 cycles.
    AVX512-BF16: VDPBF16PS adds 16 pairs of bf16 products per 512-bit instruction (64 FLOP), on
    two FMA units (assumed, as for FP32).
    """
    if "amx_bf16" in flags:
        return 1024, "AMX-BF16: one tile multiply unit = 16 x 16 x 32 x 2 FLOP per 16 cycles"
    if "avx512_bf16" in flags:
        return 128, "AVX512-BF16: VDPBF16PS, 2 units x 16 lanes x 2 products x 2 (multiply + add)"
    return None, ("no native bf16 (neither AMX-BF16 nor AVX512-BF16 in the CPU flags): bf16 is "
                  "emulated, so its figures are not a target here")


def gpu_peak(name: str) -> dict[str, Any]:
    """FP32 peak GFLOP/s of a named NVIDIA GPU, or null with the reason.

    A table key matches when its words appear, in order and whole, among the name's words
    ("L4" does not match "NVIDIA L40"); of the keys that match, the one with the most words, then
    the longest, wins ("H100 NVL" over "H100").
    """
    words = _words(name)
    matches = [key for key in GPU_FP32_TFLOPS if _contains(words, _words(key))]
    no_bf16 = {"native_bf16": True, "bf16_gflops": None,
               "bf16_method": "GPU tensor-core bf16 peaks are not tabulated"}
    if not matches:
        return {"fp32_gflops": None, "method": f"no FP32 figure known for GPU {name!r}", **no_bf16}
    key = max(matches, key=lambda k: (len(_words(k)), len(k)))
    tflops = GPU_FP32_TFLOPS[key]
    return {"fp32_gflops": tflops * 1000,
            "method": f"NVIDIA's FP32 (non-tensor-core) figure for {key}: {tflops} TFLOP/s "
                      f"(GPU {name!r})", **no_bf16}


def peak_for(device: str) -> dict[str, Any]:
    return cpu_peak() if device == "cpu" else gpu_peak(device)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _contains(words: list[str], part: list[str]) -> bool:
    return any(words[i:i + len(part)] == part for i in range(len(words) - len(part) + 1))


def measured_gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best of `repeats` float32 size x size matrix products through numpy's BLAS, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), np.float32)
    b = rng.random((size, size), np.float32)
    best_s = min(time_calls(lambda: a @ b, repeats, warmup=1)) / 1000  # warm-up: threads, caches
    return 2 * size**3 / best_s / 1e9


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
