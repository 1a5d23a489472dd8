"""One training run of the study, in its own process (so that peak RSS is this run's alone).

    python -m pretrain.study.worker SPEC.json      # writes <output_dir>/result.json

SPEC holds: task ("gpt"/"bert"), config (YAML path), overrides (dotted list), output_dir,
zeroshot (bool), zeroshot_limit, keep_checkpoint, plus any labels, copied into the result.
The result adds the training summary, the final validation loss, the validation and training
curves, the median tokens/s of the logged steps, peak memory, the optimizer-state bytes held at
the end of training (``memopt.base.optimizer_state_bytes`` on the engine's optimizer, plus
GaLore's projection matrices, which galore-torch keeps in a Python object), Adapprox's mean
rank, and the zero-shot summary. A run that stops on non-finite losses is a result with
``failed: true`` (its final validation loss counts as infinite when choosing the lr).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

from pretrain import baselines
from pretrain.train.callbacks import Callback

_PARAM_NAMES: dict[int, str] = {}


def register_galore() -> None:
    """Make ``galore_adamw`` a name the config and ``memopt.create_optimizer`` accept, in this
    process only (memopt itself is not changed). GaLore projects the gradients of the
    transformer layers' matrices; embeddings, norms and biases get plain AdamW, as in the
    GaLore reference scripts."""
    import galore_torch

    from memopt import registry

    class GaLoreAdamW(galore_torch.GaLoreAdamW):
        def __init__(self, params, lr: float = 1e-3, rank: int = 128, update_proj_gap: int = 200,
                     scale: float = 0.25, proj_type: str = "std", betas=(0.9, 0.999), eps: float = 1e-6,
                     weight_decay: float = 0.0):
            params = list(params)
            low, regular = [], []
            for p in params:
                name = _PARAM_NAMES.get(id(p), "")
                (low if p.ndim == 2 and "layers." in name else regular).append(p)
            groups = [{"params": regular}]
            if low:
                groups.append({"params": low, "rank": rank, "update_proj_gap": update_proj_gap,
                               "scale": scale, "proj_type": proj_type})
            super().__init__(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             no_deprecation_warning=True)

    registry.OPTIMIZERS["galore_adamw"] = GaLoreAdamW


def register_optimizer(spec: dict) -> None:
    """Make the spec's optimizer name known before its config is read (the config checks it)."""
    if spec.get("optimizer") == "galore_adamw":
        register_galore()
    if spec.get("optimizer") in baselines.NAMES:
        baselines.register()


def state_bytes(opt) -> int:
    from memopt.base import optimizer_state_bytes

    total = optimizer_state_bytes(opt)
    for s in opt.state.values():
        proj = s.get("projector") if isinstance(s, dict) else None
        m = getattr(proj, "ortho_matrix", None)
        for t in (m if isinstance(m, (list, tuple)) else [m]):
            if t is not None:
                total += t.untyped_storage().nbytes()
    return total


def adapprox_mean_rank(opt):
    ranks = [s["rank"] for s in opt.state.values() if isinstance(s, dict) and "rank" in s and "Q" in s]
    return sum(ranks) / len(ranks) if ranks else None


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(rows: list[dict]) -> dict:
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r and r["step"] > 1]
    vals = [r["val_loss"] for r in val]
    final_val = vals[-1] if vals else None
    return dict(
        val_curve=[[r["tokens"], r["val_loss"]] for r in val],
        train_curve=[[r["tokens"], r["loss"]] for r in train],
        final_val_loss=final_val if final_val is not None and math.isfinite(final_val) else None,
        final_train_loss=train[-1]["loss"] if train else None,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        peak_memory_bytes=max((r.get("peak_memory_bytes", 0) for r in train), default=None),
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class StudyProbe(Callback):
    """The study's hooks into the trainer: remember parameter names (GaLore picks its matrices
    by name) and time every optimizer step (wall and process CPU time)."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    def on_model_built(self, trainer, model) -> None:
        _PARAM_NAMES.update({id(p): n for n, p in model.named_parameters()})
        if trainer.cfg.optimizer.name in baselines.NAMES:
            baselines.register(model)  # Adam-mini / APOLLO-Mini partition the model by parameter name

    def post_train_batch(self, trainer, metrics) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))


def run(spec: dict) -> dict:
    from pretrain.config import load_run_config
    from pretrain.train.tasks import TASKS
    from pretrain.train.trainer import Trainer, TrainingError

    cfg = load_run_config(spec["config"], list(spec["overrides"]))
    out = Path(cfg.output_dir)
    probe = StudyProbe()
    trainer = Trainer(cfg, TASKS[spec["task"]], callbacks=[probe])
    stamps = probe.stamps
    result = dict(spec)
    t0 = time.perf_counter()
    try:
        result["summary"] = trainer.fit()
        result["failed"] = False
    except TrainingError as e:
        result.update(failed=True, error=str(e), summary=None)
    result["train_wall_s"] = time.perf_counter() - t0
    engine = trainer.engine
    if engine is not None:
        result["optimizer_state_bytes"] = state_bytes(engine.optimizer)
        result["adapprox_mean_rank"] = adapprox_mean_rank(engine.optimizer)
        result["param_count"] = sum(p.numel() for p in engine.module.parameters())
        result["param_bytes"] = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    result.update(curves(read_metrics(out)))
    if len(stamps) > 1:
        # Steps 2..N (validation passes in between included). CPU time is the load-independent
        # cost: on a machine shared with other jobs wall-clock tokens/s mostly measures the load.
        n = len(stamps) - 1
        per_step = spec.get("tokens_per_step") or 0
        result["wall_per_step_s"] = (stamps[-1][0] - stamps[0][0]) / n
        result["cpu_per_step_s"] = (stamps[-1][1] - stamps[0][1]) / n
        result["tokens_per_cpu_s"] = per_step / result["cpu_per_step_s"] if result["cpu_per_step_s"] > 0 else None
        result["torch_threads"] = torch_threads()
    if result["failed"]:
        result["final_val_loss"] = None
    result["zeroshot"] = None
    if spec.get("run_zeroshot") and not result["failed"]:
        t1 = time.perf_counter()
        result["zeroshot"] = zeroshot(cfg.checkpoint_dir, spec.get("zeroshot_limit"))
        result["zeroshot_wall_s"] = time.perf_counter() - t1
    if not spec.get("keep_checkpoint") and cfg.checkpoint_dir.exists():
        shutil.rmtree(cfg.checkpoint_dir)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t0
    return result


def result_file(spec: dict) -> str:
    return "result.json" if spec.get("kind", "train") == "train" else "eval_result.json"


def zeroshot(checkpoint_dir, limit):
    from pretrain.eval.runner import evaluate, summary
    from pretrain.eval.tasks import LOCAL_TASKS
    from pretrain.checkpoint import list_checkpoints

    ckpts = list_checkpoints(Path(checkpoint_dir))
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir} to evaluate")
    return summary(evaluate(LOCAL_TASKS, checkpoint=str(ckpts[-1]), limit=limit))


def evaluate_only(spec: dict) -> dict:
    """Zero-shot evaluation of a finished run's final checkpoint (then the checkpoint is removed)."""
    t0 = time.perf_counter()
    result = dict(spec, zeroshot=zeroshot(spec["checkpoint_dir"], spec.get("zeroshot_limit")), failed=False)
    result["zeroshot_wall_s"] = time.perf_counter() - t0
    shutil.rmtree(spec["checkpoint_dir"], ignore_errors=True)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    register_optimizer(spec)
    try:
        result = run(spec) if spec.get("kind", "train") == "train" else evaluate_only(spec)
    except Exception as e:  # a crash is recorded, the study goes on
        traceback.print_exc()
        result = dict(spec, failed=True, error=f"{type(e).__name__}: {e}", final_val_loss=None)
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / result_file(spec)).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
