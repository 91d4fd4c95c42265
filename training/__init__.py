"""``prefix-serve train``: learn a prefix for a task on the frozen base model and save it as a PEFT adapter.

It sits above both ``prefixes`` (the artifact formats it saves and parses) and ``server`` (the engine that
measures exact match), so neither of them imports it; the command line (``server/cli.py``) reaches it lazily.
:mod:`training.loop` is the loop; :mod:`training.engine_eval` the greedy generations through the engine.
Exported: :class:`TrainConfig`, :class:`TrainResult`, :class:`TrainingError` and :func:`train`.
"""

from training.loop import TrainConfig, TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
