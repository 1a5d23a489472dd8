"""Run lm-eval on an HF export (``hf`` model) or on a checkpoint in memory (``MegatronGPTLM``)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from .tasks import LOCAL_TASKS, task_manager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def build_checkpoint_lm(checkpoint: str, run_config: Optional[str] = None, tokenizer: Optional[str] = None,
                        batch_size: int = 8):
    """Our GPT with a checkpoint's weights (any engine), wrapped for lm-eval."""
    from pretrain.data.tokenizer import SentencePieceTokenizer
    from pretrain.export.errors import ExportError
    from pretrain.export.hf import build_source_model, read_checkpoint

    from .lm import MegatronGPTLM

    src = read_checkpoint(checkpoint, run_config, tokenizer)
    if src.kind != "gpt":
        raise ExportError("zero-shot evaluation needs a GPT (causal LM) checkpoint")
    model = build_source_model(src.cfg, src.state_dict)
    return MegatronGPTLM(model, SentencePieceTokenizer(src.tokenizer), batch_size=batch_size)


def evaluate(tasks: Sequence[str] = LOCAL_TASKS, hf: Optional[str] = None, checkpoint: Optional[str] = None,
             run_config: Optional[str] = None, tokenizer: Optional[str] = None, limit: Optional[int] = None,
             batch_size: int = 8, include_path: Optional[str] = None, lm=None) -> dict:
    """lm-eval ``simple_evaluate`` on exactly one of ``hf`` (an export dir), ``checkpoint`` or
    ``lm``. Local task names (``heldout_*``) are resolved from the shipped YAMLs; any other name
    is passed to lm-eval as is (standard tasks need their data available)."""
    import lm_eval

    if sum(x is not None for x in (hf, checkpoint, lm)) != 1:
        raise ValueError("give exactly one of hf=, checkpoint=, lm=")
    tm = task_manager(include_path, tasks)
    kw = dict(tasks=list(tasks), task_manager=tm, limit=limit, log_samples=False, bootstrap_iters=0,
              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    if hf is not None:
        # batch_size=1: no padding, so the hf route's arithmetic matches the in-memory route's
        args = f"pretrained={hf},dtype=float32,prefix_token_id=3,trust_remote_code=False"
        return lm_eval.simple_evaluate(model="hf", model_args=args, batch_size=1, device="cpu", **kw)
    if lm is None:
        lm = build_checkpoint_lm(checkpoint, run_config, tokenizer, batch_size)
    return lm_eval.simple_evaluate(model=lm, **kw)


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
