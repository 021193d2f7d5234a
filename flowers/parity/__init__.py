"""`flowers parity`: the same weights and real photos give the same numbers under every backend.

check      the orchestration, the comparison and its targets, parity.json, the report's table
worker     one backend's side (predict, then train from the saved init), a one-shot child process
"""

from flowers.parity.check import (
    DEFAULT_BACKENDS,
    PARITY_FILE,
    PARITY_LEARNING_RATE,
    TARGET_MAX_ABS_LOSS_DIFF,
    TARGET_MAX_ABS_PROB_DIFF,
    describe,
    format_table,
    missed_targets,
    notes,
    parity_experiment,
    parse_backends,
    read_parity,
    run_parity,
    write_parity,
)

__all__ = ["DEFAULT_BACKENDS", "PARITY_FILE", "PARITY_LEARNING_RATE", "TARGET_MAX_ABS_LOSS_DIFF",
           "TARGET_MAX_ABS_PROB_DIFF", "describe", "format_table", "missed_targets", "notes",
           "parity_experiment", "parse_backends", "read_parity", "run_parity", "write_parity"]
