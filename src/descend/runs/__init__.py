"""descend.runs: the application behind ``descend train``, ``predict`` and ``generate``.

A run is a directory: ``config.json``, metrics, checkpoints, the final weights and a summary
(:func:`run_training`); ``descend predict`` and ``descend generate`` read it back.
"""

from descend.runs._run import RUN_FILES, RunError, RunSpec, check_out_dir, load_run_spec, prepare, run_training

__all__ = ["RUN_FILES", "RunError", "RunSpec", "check_out_dir", "load_run_spec", "prepare", "run_training"]
