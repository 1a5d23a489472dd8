"""Zero-shot evaluation: the in-memory checkpoint route and lm-eval's `hf` route on the export
agree; local held-out tasks are reproducible; results go to JSON and a table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
CACHE = str(ROOT / "data/cache")
sys.path.insert(0, str(ROOT / "tools"))
pytest.importorskip("lm_eval")

LIMIT = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT trained a few steps (so its predictions are not uniform) and its export."""
    from pretrain.config import load_run_config
    from pretrain.export import export
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    out = tmp_path_factory.mktemp("evalrun")
    cfg = load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [
        f"output_dir={out}", f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}", "train.progress_bar=false",
        "train.eval_every=0", "checkpoint.every=0", "train.steps=8", "optimizer.name=adamw", "optimizer.lr=3e-3"])
    train(cfg, GPT)
    ckpt = out / "checkpoints" / "step_00000008"
    hf = out / "hf"
    export(str(ckpt), str(hf), verify_tokenizer=False)
    return ckpt, hf


def test_checkpoint_and_hf_routes_agree(trained, tmp_path, capsys):
    import eval_zeroshot

    from pretrain.eval.runner import evaluate, summary

    ckpt, hf = trained
    out = tmp_path / "ckpt.json"
    assert eval_zeroshot.main(["--checkpoint", str(ckpt), "--limit", str(LIMIT), "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "heldout_cloze" in table and "word_perplexity" in table
    mem = json.loads(out.read_text())["summary"]
    via_hf = summary(evaluate(hf=str(hf), limit=LIMIT))
    assert set(mem) == set(via_hf) == {"heldout_cloze", "heldout_nextpassage", "heldout_ppl"}
    for task, metrics in via_hf.items():
        for name, value in metrics.items():
            other = mem[task][name]
            if "perplexity" in name or name == "bits_per_byte":
                assert abs(other - value) / value < 0.01, (task, name, other, value)
                assert abs(other - value) / value < 1e-4, (task, name, other, value)  # in fact much closer
            else:
                assert other == value, (task, name, other, value)
    # a trained model is better than chance on held-out perplexity: the metrics carry signal
    assert mem["heldout_ppl"]["byte_perplexity"] < 8192 ** (1 / 3)


def test_adapter_loglikelihood_matches_a_direct_computation(trained):
    """The adapter's score of one continuation equals log-softmax summed by hand on the export."""
    from lm_eval.api.instance import Instance
    from transformers import GPT2LMHeadModel

    from pretrain.eval.runner import build_checkpoint_lm

    ckpt, hf_dir = trained
    lm = build_checkpoint_lm(str(ckpt))
    ctx, cont = "It is a truth universally acknowledged, that a single man", " in possession"
    (score, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
    ids = lm.tok_encode(ctx + cont)
    n_ctx = len(lm.tok_encode(ctx))
    hf = GPT2LMHeadModel.from_pretrained(str(hf_dir), local_files_only=True).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
    expected = sum(float(logp[i - 1, ids[i]]) for i in range(n_ctx, len(ids)))
    assert abs(score - expected) < 1e-4
    with pytest.raises(NotImplementedError):
        lm.generate_until([])


def test_local_tasks_are_reproducible_from_the_heldout_text(tmp_path):
    from pretrain.eval.build_tasks import build
    from pretrain.eval.tasks import LOCAL_TASKS, TASK_DIR

    sizes = build(tmp_path)
    assert sizes == {"heldout_cloze": 300, "heldout_nextpassage": 200, "heldout_ppl": 100}
    for name in LOCAL_TASKS:
        assert (tmp_path / f"{name}.jsonl").read_text() == (TASK_DIR / f"{name}.jsonl").read_text(), name
    row = json.loads((TASK_DIR / "heldout_nextpassage.jsonl").read_text().splitlines()[0])
    assert len(row["choices"]) == 4 and 0 <= row["label"] < 4
    # data paths stay relative to the task directory (tasks/utils.py resolves them), so a clone
    # anywhere works; tests/pretrain/eval/test_lm_eval_cli.py runs the stock CLI on them from another directory
    for name in LOCAL_TASKS:
        text = (TASK_DIR / f"{name}.yaml").read_text()
        assert "custom_dataset: !function utils.load_local" in text and f"test: {name}.jsonl" in text
