"""Fine-tuning with LoRA: HardNeg-DiffusionITM and Discffusion's few-shot prompt learning.

``fastitm finetune --recipe hardneg|discffusion --data synthetic|FILE.jsonl --out DIR`` or
:func:`finetune`; the adapter loads with ``fastitm.load_model(path, lora=DIR)``.
See :mod:`fastitm.finetune.recipes` for the losses and :mod:`fastitm.models.lora` for the adapters
(which ``load_model`` merges too).

May import: :mod:`fastitm.evaluate` (a task's few-shot training part), :mod:`fastitm.engine`,
:mod:`fastitm.models`, :mod:`fastitm.core`, :mod:`fastitm.data`; not the surfaces.
"""

from ..models.lora import add_lora, load_adapter, save_adapter
from .examples import TrainExample, load_examples
from .loop import DEFAULTS, RECIPES, finetune

__all__ = ["DEFAULTS", "RECIPES", "TrainExample", "add_lora", "finetune", "load_adapter", "load_examples",
           "save_adapter"]
