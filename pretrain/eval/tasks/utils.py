"""Dataset loader the task YAMLs name with ``custom_dataset: !function utils.load_local``.

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which resolves a relative
path against the working directory; resolving it here, against this file, lets the stock
``lm_eval --include_path pretrain/eval/tasks`` run from any directory. lm-eval imports this file
by path, outside the ``pretrain`` package, so it imports nothing from the project.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_local(data_files=None, **_metadata):
    # lm-eval also passes the task's metadata (and the CLI's model_args) as keywords.
    import datasets

    if not data_files:
        raise ValueError("a local task needs dataset_kwargs.data_files")
    files = {split: str(HERE / name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
