"""A run on a GPT-2-BPE corpus (vocab.json + merges.txt built here, offline) exports to Hugging
Face: the logit check passes, the written tokenizer gives the run's ids with <|endoftext|> as
bos/eos/pad, and the stock lm_eval CLI on the export gives exactly tools/eval_zeroshot.py's
numbers (which agree with the in-memory checkpoint route)."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PY = sys.executable
TASKS = "heldout_ppl,heldout_cloze"
LIMIT = 4
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           CUDA_VISIBLE_DEVICES="")
LM_EVAL = shutil.which("lm_eval", path=os.path.dirname(PY)) or shutil.which("lm_eval")
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))  # bpe_helpers


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A byte-level BPE in GPT-2's file format trained on bundled text, a corpus preprocessed
    with it (Megatron-LM's flags) and a 3-step run on that corpus; returns (run dir, bpe dir)."""
    from bpe_helpers import write_gpt2_bpe

    from pretrain.config import load_run_config
    from pretrain.data import bundled
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    d = tmp_path_factory.mktemp("gpt2bpe_export")
    texts = [doc["text"][:800] for doc in itertools.islice(bundled.corpus_documents("train"), 120)]
    write_gpt2_bpe(d / "bpe", texts, vocab_size=500)
    with open(d / "corpus.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    cmd = [PY, str(ROOT / "tools/preprocess_data.py"), "--input", str(d / "corpus.jsonl"),
           "--output-prefix", str(d / "corpus"), "--tokenizer-type", "GPT2BPETokenizer",
           "--vocab-file", str(d / "bpe/vocab.json"), "--merge-file", str(d / "bpe/merges.txt"),
           "--append-eod", "--workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [
        f"output_dir={d / 'run'}", f"data.blend=[{d / 'corpus_text_document'}]", f"data.tokenizer={d / 'bpe'}",
        f"data.cache_dir={d / 'cache'}", "train.progress_bar=false", "train.eval_every=0", "checkpoint.every=0",
        "train.steps=3", "optimizer.name=adamw", "optimizer.lr=3e-3"])
    train(cfg, GPT)
    return d / "run", d / "bpe"


@pytest.fixture(scope="module")
def exported(bpe_run):
    run, _ = bpe_run
    out = run.parent / "hf"
    proc = subprocess.run([PY, str(ROOT / "tools/convert_to_hf.py"), str(run / "checkpoints/step_00000003"), str(out)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_passes_the_logit_check_and_keeps_the_ids(bpe_run, exported):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, GenerationConfig

    _, bpe_dir = bpe_run
    out, report = exported
    assert report["max_abs_diff"] <= report["tol"] == 1e-4 and report["hf_class"] == "GPT2LMHeadModel"
    assert report["tokenizer"]["type"] == "huggingface" and report["tokenizer"]["tokens_compared"] > 10_000
    # the reference: the tokenizers library on the run's own files, not the exporter's code
    ref = ByteLevelBPETokenizer(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"))
    eot = ref.token_to_id("<|endoftext|>")
    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for text in ["Hello world, it's 3.14 o'clock.", "  two  spaces\nand\ttabs ", "émigré 🙂", "a <|endoftext|> b"]:
        assert hf.encode(text, add_special_tokens=False) == ref.encode(text).ids, text
    assert hf.bos_token == hf.eos_token == hf.pad_token == "<|endoftext|>"
    assert hf.bos_token_id == hf.eos_token_id == eot
    assert len(hf) == ref.get_vocab_size() == 500
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == eot
    assert config["vocab_size"] >= 500  # padded rows are exported too
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.bos_token_id == gen.eos_token_id == eot


def test_a_tokenizer_that_changes_ids_is_refused(bpe_run, tmp_path):
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.export.errors import ExportError
    from pretrain.export.hf_tokenizer import export_tokenizer
    from pretrain.export.tokenizer import compare_encodings

    source = load_tokenizer(str(bpe_run[1]))
    wrong = export_tokenizer(source, 64)
    wrong.add_tokens(["the"])  # a new whole-word token: "the" no longer encodes as before
    with pytest.raises(ExportError, match="differs"):
        compare_encodings(wrong, source, "bpe", ["the cat sat on the mat"])


@pytest.mark.skipif(LM_EVAL is None, reason="no lm_eval executable next to this Python")
def test_stock_lm_eval_cli_matches_eval_zeroshot_on_both_routes(bpe_run, exported, tmp_path):
    import eval_zeroshot

    run, _ = bpe_run
    out, _ = exported
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cmd = [LM_EVAL, "--model", "hf", "--model_args", f"pretrained={out}", "--tasks", TASKS,
           "--include_path", str(ROOT / "pretrain/eval/tasks"), "--limit", str(LIMIT), "--output_path", "res"]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(next((cwd / "res").rglob("results_*.json")).read_text())["results"]

    via_hf, via_ckpt = tmp_path / "hf.json", tmp_path / "ckpt.json"
    assert eval_zeroshot.main(["--hf", str(out), "--tasks", TASKS, "--limit", str(LIMIT), "--output", str(via_hf)]) == 0
    assert eval_zeroshot.main(["--checkpoint", str(run / "checkpoints/step_00000003"), "--tasks", TASKS,
                               "--limit", str(LIMIT), "--output", str(via_ckpt)]) == 0
    ours, mem = (json.loads(p.read_text())["results"] for p in (via_hf, via_ckpt))
    assert set(ours) == set(stock) == set(mem) == set(TASKS.split(","))
    compared = 0
    for task, metrics in ours.items():
        for key, value in metrics.items():
            if isinstance(value, float) and "_stderr" not in key:
                assert stock[task][key] == value, (task, key, stock[task][key], value)
                if "acc" in key:
                    assert mem[task][key] == value, (task, key)
                else:  # the in-memory route: our model's arithmetic, not HF's
                    assert abs(mem[task][key] - value) / value < 1e-4, (task, key, mem[task][key], value)
                compared += 1
    assert compared == 5  # word/byte perplexity, bits_per_byte; cloze perplexity and acc
