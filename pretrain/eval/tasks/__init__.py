"""Local lm-eval tasks (YAML + JSONL data) built from held-out text; see pretrain/eval/build_tasks.py."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import yaml

TASK_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("heldout_cloze", "heldout_nextpassage", "heldout_ppl")


def materialize(dest: str | None = None) -> str:
    """Copy the task YAMLs into ``dest`` (a temp dir by default) with absolute data_files paths,
    so lm-eval finds the data whatever the working directory. Returns the include path."""
    dest_dir = Path(dest or tempfile.mkdtemp(prefix="memopt_tasks_"))
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in LOCAL_TASKS:
        spec = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
        files = spec["dataset_kwargs"]["data_files"]
        spec["dataset_kwargs"]["data_files"] = {k: str(TASK_DIR / v) for k, v in files.items()}
        (dest_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(dest_dir)


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

    paths = [materialize()] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths, include_defaults=defaults)
