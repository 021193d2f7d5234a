"""`flowers bench`: every backend against native code and the hardware (used only by that command).

run        orchestration: worker processes driven round by round, figures, bench.json/.md
targets    the performance targets and whether a bench.json's figures meet them
render     bench.md: header, figures table, targets table
worker     one backend's side, in its own process (python -m flowers.bench.worker)
native     the same network as plain PyTorch and a plain tf.function, for the keras/native ratios
           (ResNet50 only: with another --backbone those figures are null with the reason)
variants   which default task a variant is timed against (forward, or train step)
hardware   the device's FP32 peak, from a table of GPUs or measured on the CPU
"""

from flowers.bench.render import markdown
from flowers.bench.run import VARIANT_KEYS, BenchSettings, device_slug, run_bench

__all__ = ["VARIANT_KEYS", "BenchSettings", "device_slug", "markdown", "run_bench"]
