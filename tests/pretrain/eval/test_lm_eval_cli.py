"""The stock ``lm_eval`` CLI on an export and the shipped local tasks: it runs from a directory
other than the repository root (the task data resolve against the task YAMLs) and gives exactly
tools/eval_zeroshot.py's numbers with no extra model_args (the export's tokenizer names </s> as
its bos, the prefix token lm-eval's hf model uses)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TASKS = "heldout_ppl,heldout_cloze"
LIMIT = 4
pytest.importorskip("lm_eval")
LM_EVAL = shutil.which("lm_eval", path=os.path.dirname(sys.executable)) or shutil.which("lm_eval")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from pretrain.config import load_run_config
    from pretrain.export import export
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    out = tmp_path_factory.mktemp("lmevalrun")
    cfg = load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [
        f"output_dir={out}", f"data.tokenizer={ROOT / 'data/tokenizer/spm_bpe_8k.model'}",
        f"data.cache_dir={ROOT / 'data/cache'}", "train.progress_bar=false", "train.eval_every=0",
        "checkpoint.every=0", "train.steps=2", "optimizer.name=adamw", "optimizer.lr=3e-3"])
    train(cfg, GPT)
    export(str(out / "checkpoints" / "step_00000002"), str(out / "hf"), verify_tokenizer=False)
    return out / "hf"


@pytest.mark.skipif(LM_EVAL is None, reason="no lm_eval executable next to this Python")
def test_stock_lm_eval_cli_matches_eval_zeroshot(export_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import eval_zeroshot

    assert json.loads((export_dir / "tokenizer_config.json").read_text())["bos_token"] == "</s>"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    # a relative include path from a directory that is not the repository root: the case the
    # CWD-relative data_files broke
    include = os.path.relpath(ROOT / "pretrain/eval/tasks", cwd)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [LM_EVAL, "--model", "hf", "--model_args", f"pretrained={export_dir}", "--tasks", TASKS,
           "--include_path", include, "--limit", str(LIMIT), "--output_path", "out"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(next((cwd / "out").rglob("results_*.json")).read_text())["results"]

    ours_file = tmp_path / "ours.json"
    assert eval_zeroshot.main(["--hf", str(export_dir), "--tasks", TASKS, "--limit", str(LIMIT),
                               "--output", str(ours_file)]) == 0
    ours = json.loads(ours_file.read_text())["results"]
    assert set(ours) == set(stock) == set(TASKS.split(","))
    compared = 0
    for task, metrics in ours.items():
        for key, value in metrics.items():
            if isinstance(value, float) and "_stderr" not in key:
                assert stock[task][key] == value, (task, key, stock[task][key], value)
                compared += 1
    assert compared == 5  # word/byte perplexity, bits_per_byte; cloze perplexity and acc
