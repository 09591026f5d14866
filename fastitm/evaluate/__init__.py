"""Evaluation: benchmark tasks read from their published on-disk formats, and the synthetic sets.

- :func:`run` (``fastitm eval TASK --data DIR``): a benchmark task through the engine, with the
  published metrics, per-item scores and accuracy vs number of timesteps (:class:`EvalReport`).
  Tasks: :data:`TASKS` (see :mod:`fastitm.evaluate.tasks`).
- :func:`calibrate` (``fastitm calibrate TASK --data DIR``): timestep weights fitted on a few
  labelled items (:mod:`fastitm.evaluate.calibrate`); :meth:`EvalReport.reweight` applies weights to
  a report's stored per-timestep scores without the model.
- :func:`hard_negatives`, :func:`image_retrieval`: the synthetic compositional sets of
  :mod:`fastitm.data` (what ``fastitm demo`` reports).

May import: :mod:`fastitm.api` (each engine call), :mod:`fastitm.engine`, :mod:`fastitm.models`,
:mod:`fastitm.core`, :mod:`fastitm.ops`, :mod:`fastitm.data`; not :mod:`fastitm.finetune` or the
surfaces (the CLI, the scorer). Inside, :mod:`.items` is at the bottom (loaders and metrics build on
it) and :mod:`.curves` sits below both the runner and the report.
"""

from .calibrate import Calibration, calibrate
from .report import EvalReport
from .runner import run
from .synthetic import NegativeReport, hard_negatives, image_retrieval, shared_plan
from .tasks import TASKS, DataError, Item, load_task

__all__ = ["TASKS", "Calibration", "DataError", "EvalReport", "Item", "NegativeReport", "hard_negatives", "image_retrieval",
           "calibrate", "load_task", "run", "shared_plan"]
