"""Tasks beyond perplexity: what compression costs when the model must use what it was shown.

Each task is one module on the interface of eval.tasks.base (a dataclass of settings that builds seeded
examples and scores every configuration of a batch on them from shared prefills), registered by name;
the sweep runs them (`tasks:` in its YAML) and `python -m eval task NAME` runs one. PPL is not one of these
modules: eval.ppl scores books by sliding windows, and adds the same `retained` from its own forwards.
"""

import importlib
import pkgutil

from .base import (TASK_RECORD_KEYS, TASKS, Example, Task, TextSource, build_task, example_records, example_shape,
                   record_key, register_task, sample_text, task_complete)

# Every module of this package registers its task on import: a new task is one new file. Alphabetical.
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "report"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TASK_RECORD_KEYS", "TASKS", "Example", "Task", "TextSource", "build_task", "example_records",
           "example_shape", "record_key", "register_task", "sample_text", "task_complete"]
