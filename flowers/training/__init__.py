"""Training: fit a run's phases, measure it, write its run directory (flowers/training/*).

    plan.py       what a run trains in this process: phases, resume positions, fit() segments
                  (keras-free)
    callbacks.py  the Keras callbacks of a run and the order fit() runs them in
    phases.py     the phases as models and data: cached features, unfreezing, learning rates
    measure.py    final evaluation, latency, predictions.csv, metrics.json, history.csv
    loop.py       train() and fit(): the run from start to its published directory

The public names below are imported on first use (PEP 562), not when the package is: they import
keras, which only comes after flowers.backend.select(), while plan.py does not and can be imported
(and tested) anywhere.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module of this package that defines it (no name is also a module's: after
# `import flowers.training.measure`, flowers.training.measure is that module)
_EXPORTS = {
    "train": "loop", "train_seeds": "loop", "fit": "loop",
    "evaluate_run": "measure", "PREDICTIONS_FILE": "measure",
    "cached_feature_data": "phases", "feature_data": "phases", "unfreeze": "phases",
    "check_unfreeze": "phases",
    "Phase": "plan",
}
__all__ = ["PREDICTIONS_FILE", "Phase", "cached_feature_data", "check_unfreeze", "evaluate_run",
           "feature_data", "fit", "train", "train_seeds", "unfreeze"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
