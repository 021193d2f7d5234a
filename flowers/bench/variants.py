"""Which default task each bench variant is timed against (run, render and worker read it), and
which variant the bf16 figures and target read."""

from __future__ import annotations

# Variants timed as a train step (train_on_batch) against the default train_step, not as a forward
# pass: portable dropout masks are only drawn in training.
TRAIN_STEP_VARIANTS = ("train.portable_random",)
# the variant whose rate is compared with the bf16 peak and with float32 (a target)
BF16_VARIANT = "train.dtype_policy=mixed_bfloat16"


def variant_baseline(variant: str) -> str:
    """The default task a variant ("section.key=value") is timed against: train_step or
    forward_batch."""
    return "train_step" if variant.split("=")[0] in TRAIN_STEP_VARIANTS else "forward_batch"
