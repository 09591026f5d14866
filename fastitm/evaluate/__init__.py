"""Evaluation: benchmark tasks read from their published on-disk formats, and the synthetic sets.

- :func:`run` (``fastitm eval TASK --data DIR``): a benchmark task through the engine, with the
  published metrics, per-item scores and accuracy vs number of timesteps (:class:`EvalReport`).
  Tasks: :data:`TASKS` (see :mod:`fastitm.evaluate.tasks`).
- :func:`hard_negatives`, :func:`image_retrieval`: the synthetic compositional sets of
  :mod:`fastitm.data` (what ``fastitm demo`` reports).
"""

from .report import EvalReport
from .runner import run
from .synthetic import NegativeReport, hard_negatives, image_retrieval, shared_plan
from .tasks import TASKS, DataError, Item, load_task

__all__ = ["TASKS", "DataError", "EvalReport", "Item", "NegativeReport", "hard_negatives", "image_retrieval",
           "load_task", "run", "shared_plan"]
