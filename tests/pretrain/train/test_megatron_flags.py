"""Megatron-LM's command lines: tools/preprocess_data.py with Megatron-LM's flags (several
--json-keys, --tokenizer-type GPT2BPETokenizer with --vocab-file/--merge-file, --partitions,
--log-interval) writes datasets megatron-core reads; a GPT-2-BPE corpus trains end to end under
the deepspeed launcher with Megatron-DeepSpeed's --deepspeed --deepspeed_config, whose optimizer
section selects the optimizer; what cannot be honoured is one line, never ignored."""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PY = sys.executable
sys.path.insert(0, str(ROOT / "tools"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A byte-level BPE in GPT-2's file format (vocab.json + merges.txt), trained here on the
    bundled text (nothing is downloaded), and a jsonl with a text and a title per document."""
    from bpe_helpers import write_gpt2_bpe

    from pretrain.data import bundled

    d = tmp_path_factory.mktemp("gpt2bpe")
    docs = list(itertools.islice(bundled.corpus_documents("train"), 120))
    texts = [doc["text"][:600] for doc in docs]
    write_gpt2_bpe(d / "bpe", texts, vocab_size=600)
    with open(d / "corpus.jsonl", "w") as f:
        for i, (doc, text) in enumerate(zip(docs, texts)):
            f.write(json.dumps({"text": text, "title": f"{doc.get('title', 'untitled')} part {i}"}) + "\n")
    return d


@pytest.fixture(scope="module")
def preprocessed(corpus):
    out = corpus / "data" / "corpus"
    cmd = [PY, str(ROOT / "tools/preprocess_data.py"), "--input", str(corpus / "corpus.jsonl"),
           "--output-prefix", str(out), "--json-keys", "text", "title",
           "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(corpus / "bpe/vocab.json"),
           "--merge-file", str(corpus / "bpe/merges.txt"), "--append-eod", "--workers", "2",
           "--partitions", "2", "--log-interval", "50"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_preprocess_with_megatron_flags_writes_what_megatron_core_reads(corpus, preprocessed):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import ByteLevelBPETokenizer

    out, proc = preprocessed
    assert "Processed 50 documents" in proc.stderr and "Processed 100 documents" in proc.stderr
    # The tokenizers library itself (GPT-2's byte-level BPE), whatever transformers' version calls its arguments.
    ref = ByteLevelBPETokenizer(str(corpus / "bpe/vocab.json"), str(corpus / "bpe/merges.txt"))
    eos = ref.token_to_id("<|endoftext|>")
    rows = [json.loads(line) for line in (corpus / "corpus.jsonl").read_text().splitlines()]
    for key in ("text", "title"):
        ds = IndexedDataset(f"{out}_{key}_document")
        assert len(ds) == len(rows) == 120
        for i in (0, 1, 57, 119):  # input order, whatever --partitions
            assert ds[i].tolist() == ref.encode(rows[i][key]).ids + [eos], (key, i)


def test_preprocess_refuses_half_a_gpt2_tokenizer(corpus, tmp_path, capsys):
    import preprocess_data

    with pytest.raises(SystemExit) as e:
        preprocess_data.main(["--input", str(corpus / "corpus.jsonl"), "--output-prefix", str(tmp_path / "x"),
                              "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(corpus / "bpe/vocab.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--merge-file" in err, err
    with pytest.raises(SystemExit) as e:
        preprocess_data.main(["--input", str(corpus / "corpus.jsonl"), "--output-prefix", str(tmp_path / "x"),
                              "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "GPT2BPETokenizer" in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpt2_bpe_corpus_trains_under_deepspeed_flags_with_the_json_optimizer(corpus, preprocessed, tmp_path):
    deepspeed_bin = Path(PY).parent / "deepspeed"
    if not deepspeed_bin.exists():
        pytest.skip("the deepspeed launcher is not installed in this environment")
    out, _ = preprocessed
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.002, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}}}))
    # gpt_tiny.yaml names adalomo: the JSON's section takes its place
    cmd = [str(deepspeed_bin), "--num_gpus", "1", "--master_port", str(_free_port()), str(ROOT / "launch/pretrain_gpt.py"),
           "--config", str(ROOT / "configs/gpt_tiny.yaml"), f"output_dir={tmp_path / 'run'}",
           f"data.blend=[{out}_text_document]", f"data.tokenizer={corpus / 'bpe'}", f"data.cache_dir={tmp_path / 'cache'}",
           "train.steps=2", "train.eval_every=0", "checkpoint.every=0", "train.progress_bar=false",
           "--deepspeed", "--deepspeed_config", str(ds_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"summary"')))["summary"]
    assert summary["engine"] == "deepspeed" and summary["steps"] == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optimizer"]["name"] == "adamw" and saved["optimizer"]["lr"] == 0.002
    assert saved["optimizer"]["hparams"] == {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01}
    assert saved["engine"]["kind"] == "deepspeed" and saved["engine"]["deepspeed_config"] == str(ds_json)
    # the model's vocabulary is the BPE's (600 ids, <|endoftext|> among them): loss starts near ln 600
    assert abs(summary["first_loss"] - 6.4) < 0.5


@pytest.mark.parametrize("section, overrides, message", [
    ({"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}}, [], "optimizer type 'OneBitAdam' is not supported"),
    ({"optimizer": {"type": "came", "params": {"lr": 1e-3, "momentum": 0.9}}}, [], "momentum"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, ["optimizer.name=lomo"], "disagrees"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}, [], "scheduler"),
])
def test_a_json_section_that_cannot_be_honoured_is_one_line(tmp_path, capsys, section, overrides, message):
    from pretrain.train.cli import main

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, **section}))
    code = main(["--config", str(ROOT / "configs/gpt_tiny.yaml"), f"output_dir={tmp_path / 'run'}", *overrides,
                 "--deepspeed", "--deepspeed_config", str(ds_json)], "gpt")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_json_optimizer_with_a_memopt_name_selects_it(tmp_path):
    from pretrain.config import load_run_config

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"optimizer": {"type": "CAME", "params": {"lr": 5e-4, "betas": [0.9, 0.999, 0.9999]}}}))
    cfg = load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [f"engine.deepspeed_config={ds_json}"])
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("came", 5e-4)
    assert cfg.optimizer.hparams == {"betas": [0.9, 0.999, 0.9999]}
