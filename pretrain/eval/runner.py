"""Run lm-eval on an HF export (``hf`` model) or on a checkpoint in memory (``MegatronGPTLM``).

Bad input (a missing or foreign model directory, an unknown task, a task whose data is not
available offline, a non-positive limit) raises ``EvalError``, ``ExportError`` or (an unreadable
checkpoint) ``CheckpointError`` with one line,
before any model is loaded where it can be checked up front.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from pretrain.errors import UserError

from .tasks import LOCAL_TASKS, task_manager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class EvalError(UserError, ValueError):
    """An evaluation request that cannot run; the message says what to fix."""


def build_checkpoint_lm(checkpoint: str, run_config: Optional[str] = None, tokenizer: Optional[str] = None,
                        batch_size: int = 8):
    """Our GPT with a checkpoint's weights (any engine), wrapped for lm-eval."""
    from pretrain.checkpoint import read_checkpoint
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.export.errors import ExportError
    from pretrain.export.hf import build_source_model

    from .lm import MegatronGPTLM

    src = read_checkpoint(checkpoint, run_config, tokenizer)
    if src.kind != "gpt":
        raise ExportError("zero-shot evaluation needs a GPT (causal LM) checkpoint")
    model = build_source_model(src.cfg, src.state_dict)
    return MegatronGPTLM(model, load_tokenizer(src.tokenizer), batch_size=batch_size)


def evaluate(tasks: Sequence[str] = LOCAL_TASKS, hf: Optional[str] = None, checkpoint: Optional[str] = None,
             run_config: Optional[str] = None, tokenizer: Optional[str] = None, limit: Optional[int] = None,
             batch_size: int = 8, include_path: Optional[str] = None, lm=None) -> dict:
    """lm-eval ``simple_evaluate`` on exactly one of ``hf`` (an export dir), ``checkpoint`` or
    ``lm``. Local task names (``heldout_*``) are resolved from the shipped YAMLs; any other name
    is passed to lm-eval as is (standard tasks need their data available)."""
    if sum(x is not None for x in (hf, checkpoint, lm)) != 1:
        raise ValueError("give exactly one of hf=, checkpoint=, lm=")
    tasks = list(tasks)
    if not tasks:
        raise EvalError("no tasks given")
    if limit is not None and limit <= 0:
        raise EvalError(f"limit must be a positive number of documents per task, got {limit}")
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"include path {include_path}: no such directory")
    if hf is not None:
        check_export(hf)
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise EvalError(f"checkpoint {checkpoint}: no such directory")

    import lm_eval

    tm = task_manager(include_path, tasks)
    kw = dict(tasks=load_tasks(tm, tasks), task_manager=tm, limit=limit, log_samples=False, bootstrap_iters=0,
              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    if hf is not None:
        # batch_size=1: no padding, so the hf route's arithmetic matches the in-memory route's. No
        # prefix_token_id: the export's tokenizer carries it (bos = the end-of-document
        # token: </s>, or GPT-2's <|endoftext|>), so the stock lm_eval CLI
        # on the same export gives the same numbers.
        args = f"pretrained={hf},dtype=float32,trust_remote_code=False"
        return lm_eval.simple_evaluate(model="hf", model_args=args, batch_size=1, device="cpu", **kw)
    if lm is None:
        lm = build_checkpoint_lm(checkpoint, run_config, tokenizer, batch_size)
    return lm_eval.simple_evaluate(model=lm, **kw)


def check_export(path: str) -> None:
    """A directory lm-eval's ``hf`` model can load as a causal LM, checked without loading it
    (transformers' own errors for these cases are long and name no fix)."""
    from pretrain.export.errors import ExportError

    d = Path(path)
    if not d.is_dir():
        raise ExportError(f"export {path}: no such directory")
    try:
        arch = json.loads((d / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError, AttributeError):
        raise ExportError(f"export {path}: no readable config.json (is it the output of tools/convert_to_hf.py?)") from None
    if not any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in arch):
        raise ExportError(f"export {path}: {', '.join(arch) or 'no architecture'} is not a causal LM; "
                          "zero-shot evaluation needs a GPT export")
    if not any((d / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise ExportError(f"export {path}: no model.safetensors")


def load_tasks(tm, names: Sequence[str]) -> list:
    """lm-eval Task/Group objects for ``names``, loaded before the model so that an unknown name or
    a dataset that is not available offline is one line naming the task. simple_evaluate accepts
    them in place of the names, so nothing is loaded twice."""
    out = []
    for name in names:
        if name not in tm.all_tasks and not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise EvalError(f"unknown task {name!r}{hint}; local tasks: {', '.join(LOCAL_TASKS)}")
        try:
            got = tm.load([name])
        except (OSError, ImportError) as e:  # datasets' offline and not-found errors are OSErrors
            raise EvalError(f"task {name!r}: cannot load its data ({type(e).__name__}: {e}); {_how_to_provide(e)}") from None
        obj = got["groups"].get(name, got["tasks"].get(name))
        # A tag or a YAML path has no object of its own name: lm-eval loads it again from the name.
        out.append(obj if obj is not None else name)
    return out


def _how_to_provide(e: BaseException) -> str:
    # datasets names the Hub dataset in its message ("Couldn't reach 'org/name' on the Hub"); the
    # hint then shows the exact call that fills the cache.
    import re

    m = re.search(r"'([\w.-]+/[\w.-]+)'", str(e))
    fetch = f"datasets.load_dataset('{m.group(1)}')" if m else "datasets.load_dataset(<its dataset_path>)"
    return (f"standard lm-eval tasks read their dataset from the local Hugging Face cache (evaluation runs "
            f"offline): run {fetch} where there is network and copy ~/.cache/huggingface (or $HF_HOME) here")


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def summary(results: dict) -> dict:
    """{task: {metric: value}} without lm-eval's stderr and filter suffixes."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if "_stderr" not in k and k != "alias" and isinstance(v, (int, float))}
    return out
