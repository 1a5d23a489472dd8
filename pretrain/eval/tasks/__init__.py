"""Local lm-eval tasks (YAML + JSONL data) built from held-out text; see pretrain/eval/build_tasks.py.

The YAMLs load their data through utils.py, relative to this directory, so this directory is
itself an lm-eval include path: ``lm_eval ... --include_path pretrain/eval/tasks`` from anywhere.
"""
from __future__ import annotations

import functools
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("heldout_cloze", "heldout_nextpassage", "heldout_ppl")


def task_manager(include_path: str | None = None, tasks=LOCAL_TASKS):
    """A TaskManager that knows the local tasks and those under ``include_path``; lm-eval's own
    task index (thousands of YAMLs, slow to scan) is added only when ``tasks`` names something
    that is not local."""
    defaults = any(t not in LOCAL_TASKS and t != "heldout" for t in tasks)
    return _task_manager(include_path, defaults)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, defaults: bool):
    # Cached: scanning lm-eval's index takes seconds, and a manager builds fresh Task objects on
    # every load, so one per process is enough.
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DIR)] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths, include_defaults=defaults)
