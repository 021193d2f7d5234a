"""Where a backbone's ImageNet weights come from, checked without importing keras.

Keras downloads them on first use into $KERAS_HOME/models (default ~/.keras/models). Checking the
cache and the download host up front turns an offline machine into a one-line error before any
data is loaded, instead of a failed download after minutes of work.
"""

from __future__ import annotations

import os
from pathlib import Path

from flowers import host
from flowers.backbones import DEFAULT, IMAGENET_HOST, Backbone, resolve
from flowers.errors import FlowersError


def keras_cache_file(spec: Backbone | None = None) -> Path:
    """Where keras keeps the downloaded (include_top=False) ImageNet weights of `spec` (ResNet50)."""
    spec = spec or resolve(DEFAULT)
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / str(spec.weights_file)


def check_available(spec: Backbone, weights: str) -> None:
    """Fail fast when model.weights="imagenet" is neither cached nor downloadable.

    Custom backbones receive the weights value themselves; KerasHub presets are checked when they
    are loaded (flowers.backbones.hub_backbone).
    """
    if weights != "imagenet" or spec.kind != "application":
        return
    cached = keras_cache_file(spec)
    if cached.is_file() or host.can_reach(IMAGENET_HOST):
        return
    raise FlowersError(
        f"{spec.name} ImageNet weights are not cached ({cached}) and {IMAGENET_HOST} cannot be "
        "reached (offline?); use --set model.weights=none, or copy the file there, or set "
        "model.weights=PATH"
    )
