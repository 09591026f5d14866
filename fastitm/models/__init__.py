"""Models: loading (:mod:`.model`: :func:`~.model.load_model`, hub ids and pipelines through
:mod:`.hub`), the families that say how each architecture encodes and denoises (:mod:`.families`: SD
1.x/2.x, SDXL, SD 3) and the speed levers applied at load (:mod:`.speed`).

May import: :mod:`fastitm.core`, :mod:`fastitm.ops`, diffusers, transformers, peft; not the engine or
anything above it. :mod:`.lora` is the LoRA adapter format (peft): ``load_model(lora=...)`` merges an
adapter at load, and :mod:`fastitm.finetune` trains and saves them.
"""
