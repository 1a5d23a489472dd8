"""tools/preprocess_data.py: Megatron .bin/.idx round trips, inputs, workers, errors."""

import gzip
import json
import os
import sys

import numpy as np
import pytest

import pretrain  # noqa: F401  (first: quiets megatron's import-time warnings)
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))

import preprocess_data  # noqa: E402

from pretrain.data import bundled  # noqa: E402
from pretrain.data.preprocess import split_sentences  # noqa: E402
from pretrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402

DOCS = [
    "Mr. Knightley, a sensible man about seven or eight-and-thirty, was not only a very old and "
    "intimate friend of the family. He walked in!\nWhat a delight it was.",
    "Short one.",
    "“Is it?” said she. The garden was wide; the house, small. See p. 4 of vol. ii. Done.",
    "Unicode: naïve café — 東京 🙂.\n\nA new paragraph starts here. And it ends.",
]


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(bundled.TOKENIZER)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre_inputs")
    jsonl = d / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "meta": i}) + "\n" for i, t in enumerate(DOCS)))
    gz = d / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": DOCS[0]}) + "\n" + json.dumps({"content": DOCS[2]}) + "\n")
    txt = d / "c.txt"
    txt.write_text(DOCS[1] + "\n" + DOCS[3].replace("\n", " ") + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = d / "d.parquet"
    pq.write_table(pa.table({"text": DOCS[2:], "n": [1, 2]}), str(parquet))
    return {"dir": d, "jsonl": str(jsonl), "gz": str(gz), "txt": str(txt), "parquet": str(parquet)}


def _run(*args):
    return preprocess_data.main([*map(str, args), "--quiet"])


def _read(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))], ds.document_indices.tolist(), ds


def test_gpt_round_trip_across_input_formats(tmp_path, inputs, tok):
    out = tmp_path / "out" / "corpus"
    summary = _run("--input", inputs["jsonl"], inputs["txt"], inputs["parquet"], "--txt-mode", "line",
                   "--tokenizer-model", bundled.TOKENIZER, "--output-prefix", out, "--append-eod")
    prefix = str(out) + "_text_document"
    assert summary["prefix"] == prefix
    expected_docs = DOCS + [DOCS[1], DOCS[3].replace("\n", " ")] + DOCS[2:]
    seqs, doc_index, ds = _read(prefix)
    # One sequence per document, read back by megatron-core exactly as written.
    assert seqs == [tok.tokenize(t) + [tok.eod] for t in expected_docs]
    assert doc_index == list(range(len(expected_docs) + 1))
    assert ds.index.dtype == np.uint16  # 8192-piece vocabulary fits 16 bits
    meta = json.load(open(prefix + ".meta.json"))
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["documents"] == len(expected_docs)
    assert meta["tokens"] == sum(map(len, seqs)) and meta["append_eod"] is True
    assert [tok.detokenize(s[:-1]) for s in seqs] == expected_docs


def test_other_json_key_and_gzip(tmp_path, inputs, tok):
    out = tmp_path / "g"
    _run("--input", inputs["gz"], "--json-key", "content", "--tokenizer-model", bundled.TOKENIZER,
         "--output-prefix", out)
    seqs, _, _ = _read(str(out) + "_content_document")
    assert seqs == [tok.tokenize(DOCS[0]), tok.tokenize(DOCS[2])]  # no --append-eod: no </s>


def test_bert_sentence_round_trip(tmp_path, inputs, tok):
    out = tmp_path / "bert"
    _run("--input", inputs["jsonl"], "--tokenizer-model", bundled.TOKENIZER, "--output-prefix", out,
         "--split-sentences")
    seqs, doc_index, _ = _read(str(out) + "_text_sentence")
    sentences = [split_sentences(d) for d in DOCS]
    assert seqs == [tok.tokenize(s) for doc in sentences for s in doc]
    assert doc_index == list(np.cumsum([0] + [len(s) for s in sentences]))


def test_sentence_splitter():
    assert split_sentences(DOCS[0]) == [
        "Mr. Knightley, a sensible man about seven or eight-and-thirty, was not only a very old "
        "and intimate friend of the family.",
        "He walked in!",
        "What a delight it was.",
    ]
    assert split_sentences(DOCS[2]) == [
        "“Is it?” said she.",
        "The garden was wide; the house, small.",
        "See p. 4 of vol. ii.",  # a lower-case numeral is not an abbreviation
        "Done.",
    ]
    assert split_sentences("A. B. Smith came. Then he left.\n\nNo end") == [
        "A. B. Smith came.", "Then he left.", "No end"]


def test_workers_give_identical_output(tmp_path, inputs):
    args = ["--input", inputs["jsonl"], inputs["txt"], "--tokenizer-model", bundled.TOKENIZER,
            "--append-eod"]
    _run(*args, "--output-prefix", tmp_path / "one", "--workers", "1")
    _run(*args, "--output-prefix", tmp_path / "two", "--workers", "2")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one_text_document{ext}").read_bytes() == \
               (tmp_path / f"two_text_document{ext}").read_bytes()


def test_progress_bar_on_stderr(tmp_path, inputs, capsys):
    preprocess_data.main(["--input", inputs["jsonl"], "--tokenizer-model", bundled.TOKENIZER,
                          "--output-prefix", str(tmp_path / "p")])
    captured = capsys.readouterr()
    assert "tokenizing" in captured.err and "4doc" in captured.err
    assert "4 documents" in captured.out


def test_skip_empty(tmp_path, tok):
    src = tmp_path / "e.jsonl"
    src.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": " \n"}) + "\n"
                   + json.dumps({"text": "two"}) + "\n")
    _run("--input", src, "--tokenizer-model", bundled.TOKENIZER, "--output-prefix", tmp_path / "o",
         "--skip-empty")
    seqs, _, _ = _read(str(tmp_path / "o_text_document"))
    assert seqs == [tok.tokenize("one"), tok.tokenize("two")]


@pytest.fixture(scope="module")
def gpt_only_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt_tok")
    return train_sentencepiece((t * 30 for t in DOCS), str(d / "gpt"), vocab_size=400)


def _bad_cases(d, gpt_only_tokenizer):
    many = d / "many.jsonl"  # the empty document comes after 50 good ones
    many.write_text("".join(json.dumps({"text": f"doc {i}."}) + "\n" for i in range(50))
                    + json.dumps({"text": ""}) + "\n")
    nokey = d / "nokey.jsonl"
    nokey.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    notspm = d / "tok.model"
    notspm.write_bytes(b"\x00garbage")
    return [
        (["--input", d / "missing.jsonl"], [], "missing.jsonl: no such file"),
        (["--input", nokey], [], "nokey.jsonl:2: no 'text' key (keys: body)"),
        (["--input", many], [], "many.jsonl:51: empty document"),
        (["--input", many], ["--workers", "2"], "many.jsonl:51: empty document"),
        (["--input", many], ["--split-sentences", "--tokenizer-model", gpt_only_tokenizer],
         "this tokenizer has no [CLS]/[SEP]/[MASK]"),
        (["--input", many], ["--tokenizer-model", notspm], "not a sentencepiece model"),
    ]


def test_errors_are_one_line_and_keep_earlier_outputs(tmp_path, inputs, gpt_only_tokenizer):
    out = tmp_path / "keep" / "corpus"
    _run("--input", inputs["jsonl"], "--tokenizer-model", bundled.TOKENIZER, "--output-prefix", out,
         "--append-eod")
    _run("--input", inputs["jsonl"], "--tokenizer-model", bundled.TOKENIZER, "--output-prefix", out,
         "--split-sentences")
    outputs = sorted(p for p in (tmp_path / "keep").iterdir())
    before = {p: p.read_bytes() for p in outputs}
    for args, extra, message in _bad_cases(tmp_path, gpt_only_tokenizer):
        if "--tokenizer-model" not in extra:
            extra = extra + ["--tokenizer-model", bundled.TOKENIZER]
        with pytest.raises(SystemExit) as e:
            _run(*args, *extra, "--output-prefix", out, "--append-eod")
        text = str(e.value.code)
        assert text.startswith("error: ") and "\n" not in text and message in text, (message, text)
        # Earlier outputs are untouched and no temporary files are left behind.
        assert sorted((tmp_path / "keep").iterdir()) == outputs, message
        assert {p: p.read_bytes() for p in outputs} == before, message
