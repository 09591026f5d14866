"""The engine and what it schedules: one checked request (:mod:`.common`: :class:`~.common.Run`,
:func:`~.common.prepare_run`) becomes denoiser batches (:mod:`.engine`), with the work it shares
(:mod:`.sharing`: the unconditional row once per image and timestep; :mod:`.image_cache`,
:mod:`.text_cache`: latents and text rows across calls), the candidates it stops early
(:mod:`.racing`), the fused attention processor (:mod:`.attention`), CUDA graphs
(:mod:`.cuda_graphs`) and the shards of a torch.distributed run (:mod:`.distributed`).

May import: :mod:`fastitm.core`, :mod:`fastitm.models`, :mod:`fastitm.ops`; not the surfaces
(``api``, ``scorer``, ``cli``), ``evaluate`` or ``finetune``.
"""

from .engine import CheckpointError, Interrupted, checkpoint_lock, model_digest, score_run

__all__ = ["CheckpointError", "Interrupted", "checkpoint_lock", "model_digest", "score_run"]
