"""The scoring core: what a score is, with no model and no scheduling.

- :mod:`.plan`: the timesteps and noise every pair is scored under (:class:`~.plan.Plan`);
- :mod:`.methods`: the three methods and their options; :mod:`.presets`: the published choices;
- :mod:`.weights`: how per-timestep scores average; :mod:`.inputs`: images and texts checked and
  decoded; :mod:`.result`: :class:`~.result.ScoreResult` and the retrieval metrics on it;
- :mod:`.interrupts`, :mod:`.locks`: Ctrl-C / SIGTERM handling and checkpoint file locks.

May import: the standard library, torch and each other; nothing else of fastitm.
"""
