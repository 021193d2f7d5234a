"""Training: fit a run's phases, measure it, write its run directory (flowers/training/*).

    plan.py       what a run trains in this process: phases, resume positions, fit() segments
                  (keras-free)
    callbacks.py  the Keras callbacks of a run and the order fit() runs them in
    phases.py     the phases as models and data: cached features, unfreezing, learning rates
    measure.py    final evaluation, latency, predictions.csv, metrics.json, history.csv
    loop.py       train() and fit(): the run from start to its published directory

Callers import from the module that defines a name (flowers.training.loop.train_seeds,
flowers.training.measure.evaluate_run): loop, measure, phases and callbacks import keras, which
only comes after flowers.backend.select(), while plan.py does not and can be imported (and
tested) anywhere. This package face re-exports nothing, so importing it imports nothing.
"""
