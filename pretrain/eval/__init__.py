"""Zero-shot evaluation with lm-eval: an in-memory adapter for checkpoints, local held-out tasks.

    from pretrain.eval import evaluate
    results = evaluate(checkpoint="runs/x/checkpoints/step_00000100", tasks=["heldout_cloze"])
    results = evaluate(hf="exports/x", tasks=["heldout_cloze"])
"""
from .runner import evaluate, results_table

__all__ = ["evaluate", "results_table"]
