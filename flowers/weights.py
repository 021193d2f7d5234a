"""Where the ResNet50 ImageNet weights come from, checked without importing keras.

Keras downloads them on first use into $KERAS_HOME/models (default ~/.keras/models). Checking the
cache and the download host up front turns an offline machine into a one-line error before any
data is loaded, instead of a failed download after minutes of work.
"""

from __future__ import annotations

import os
from pathlib import Path

from flowers.data import can_reach
from flowers.errors import FlowersError

IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_HOST = "storage.googleapis.com"


def keras_cache_file() -> Path:
    """Where keras keeps the downloaded ResNet50 (include_top=False) ImageNet weights."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / IMAGENET_NOTOP_FILE


def check_available(weights: str) -> None:
    """Fail fast when model.weights="imagenet" is neither cached nor downloadable."""
    if weights != "imagenet":
        return
    cached = keras_cache_file()
    if cached.is_file() or can_reach(IMAGENET_HOST):
        return
    raise FlowersError(
        f"ResNet50 ImageNet weights are not cached ({cached}) and {IMAGENET_HOST} cannot be "
        "reached (offline?); use --set model.weights=none, or copy the file there, or set "
        "model.weights=PATH"
    )
