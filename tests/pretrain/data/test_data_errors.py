"""Data that megatron-core would hang or crash on is a one-line DataError before it is called.

Tiny datasets with the default 98,1,1 split leave some split empty: megatron's GPT epoch count
then loops forever. The timeouts make such a regression fail instead of hanging the suite.
"""

import json
import os

import numpy as np
import pytest

from pretrain.data import bundled, build_bert_datasets, build_gpt_datasets, load_tokenizer
from pretrain.data import indexed
from pretrain.data.indexed import IndexedDatasetWriter
from pretrain.data.preprocess import preprocess
from pretrain.data.readers import DataError

pytestmark = pytest.mark.usefixtures("model_parallel_tp1")  # megatron's datasets need a group


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled.TOKENIZER)


def _write(prefix, documents, metadata=None):
    """documents: lists of sentences, each a list of token ids."""
    writer = IndexedDatasetWriter(str(prefix))
    for doc in documents:
        writer.add_document(doc)
    writer.finalize(metadata)
    return str(prefix)


def _gpt_docs(n, length, offset=5):
    return [[[offset + (i * 7 + j) % 400 for j in range(length)]] for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data_errors")
    return {
        "tiny": _write(d / "tiny", _gpt_docs(3, 40)),
        "big": _write(d / "big", _gpt_docs(200, 100)),
        # 10 documents: "80,19,1" gives train 8, valid 2 and test none of them.
        "ten": _write(d / "ten", _gpt_docs(10, 40)),
        "one_doc": _write(d / "one_doc", _gpt_docs(1, 17)),
        "bert_tiny": _write(d / "bert_tiny", [[[10 + i, 11, 12, 13, 14]] * 3 for i in range(3)]),
        "bert_one_sentence": _write(d / "bert_one_sentence",
                                    [[[10 + i, 11, 12, 13]] for i in range(20)]),
    }


@pytest.mark.timeout(60)
def test_tiny_dataset_with_default_split_names_prefix_and_split(data, tok, tmp_path):
    with pytest.raises(DataError) as err:
        build_gpt_datasets(data["tiny"], tok, 16, (10, 5, 0), cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        data["tiny"] + ": the valid part of split '98,1,1' has 0 documents and 0 tokens")
    assert "5 sample(s) are asked" in msg and "data.split=100,0,0" in msg


@pytest.mark.timeout(60)
def test_split_asked_for_no_samples_is_dropped_not_checked(data, tok, tmp_path):
    # The trainer asks 0 test samples; an empty test split used to hang even so.
    train, valid, test = build_gpt_datasets(data["ten"], tok, 16, (10, 5, 0), split="80,19,1",
                                            cache_dir=str(tmp_path))
    assert len(train) >= 10 and len(valid) >= 5 and test is None
    train, valid, test = build_gpt_datasets(data["tiny"], tok, 16, (10, 0, 0),
                                            cache_dir=str(tmp_path))
    assert len(train) >= 10 and valid is None and test is None


# megatron builds a blend's prefixes in worker threads, which a signal cannot stop: the thread
# method ends the whole run instead of hanging (in the next test too).
@pytest.mark.timeout(60, method="thread")
def test_weighted_blend_with_one_small_prefix(data, tok, tmp_path):
    with pytest.raises(DataError, match=r"tiny: the valid part of split '98,1,1' has 0 documents.*"
                                        r"but 2 sample\(s\) are asked"):
        build_gpt_datasets(["0.9", data["big"], "0.1", data["tiny"]], tok, 16, (100, 10, 0),
                           cache_dir=str(tmp_path))
    # Without an unweighted blend's per-prefix sample, megatron failed an assertion instead.
    with pytest.raises(DataError, match="tiny: the valid part.*unweighted blend needs at least one"):
        build_gpt_datasets([data["big"], data["tiny"]], tok, 16, (100, 10, 0),
                           cache_dir=str(tmp_path))
    train, valid, test = build_gpt_datasets(["0.9", data["big"], "0.1", data["tiny"]], tok, 16,
                                            (100, 0, 0), cache_dir=str(tmp_path))
    assert len(train) >= 100 and valid is None and test is None


@pytest.mark.timeout(60)
def test_a_split_needs_the_tokens_of_one_sample(data, tok, tmp_path):
    # 17 tokens make one sample of 16 (+1 for the shifted labels): repeated epochs are fine.
    train, _, _ = build_gpt_datasets(data["one_doc"], tok, 16, (3, 0, 0), split="1,0,0",
                                     cache_dir=str(tmp_path))
    assert len(train) >= 3
    with pytest.raises(DataError, match=r"one_doc: the train part of split '1,0,0' has 1 documents "
                                        r"and 17 tokens, fewer than one sample \(18 tokens for "
                                        r"seq_length 17\).*shorter seq_length"):
        build_gpt_datasets(data["one_doc"], tok, 17, (3, 0, 0), split="1,0,0",
                           cache_dir=str(tmp_path))


@pytest.mark.timeout(60, method="thread")
def test_normal_datasets_still_build(data, tok, tmp_path):
    train, valid, test = build_gpt_datasets(data["big"], tok, 16, (500, 20, 20),
                                            cache_dir=str(tmp_path))
    assert len(train) >= 500 and len(valid) >= 20 and len(test) >= 20
    train, valid, _ = build_gpt_datasets(["0.5", data["big"], "0.5", data["ten"]], tok, 16,
                                         (100, 10, 0), split="80,19,1", cache_dir=str(tmp_path))
    assert len(train) >= 100 and len(valid) >= 10


@pytest.mark.timeout(60)
def test_bert_small_splits(data, tok, tmp_path):
    # megatron raised an IndexError on an empty split...
    with pytest.raises(DataError, match=r"bert_tiny: the valid part of split '98,1,1' has 0 docu"):
        build_bert_datasets(data["bert_tiny"], tok, 32, (10, 5, 0), cache_dir=str(tmp_path))
    train, valid, test = build_bert_datasets(data["bert_tiny"], tok, 32, (10, 0, 0),
                                             cache_dir=str(tmp_path))
    assert len(train) >= 10 and valid is None and test is None
    # ...and ran 2**31 epochs when no document can make a sample (one sentence each).
    with pytest.raises(DataError, match=r"bert_one_sentence: the train part .* no document megatron "
                                        r"can make a BERT sample from \(one needs at least 2"):
        build_bert_datasets(data["bert_one_sentence"], tok, 32, (10, 0, 0), split="1,0,0",
                            cache_dir=str(tmp_path))


def test_out_of_vocabulary_ids_are_an_error(tok, tmp_path):
    vocab = tok.vocab_size
    ok = _write(tmp_path / "ok", [[[1, 2, vocab - 1] * 10]] * 4)
    build_gpt_datasets(ok, tok, 8, (4, 0, 0), split="1,0,0", cache_dir=str(tmp_path / "c"))
    oov = _write(tmp_path / "oov", [[[1, 2, 3] * 10], [[4, vocab + 7, 5] * 10]] * 2)
    with pytest.raises(DataError) as err:
        build_gpt_datasets(oov, tok, 8, (4, 0, 0), split="1,0,0", cache_dir=str(tmp_path / "c"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(oov + ": token id ")
    assert f"token id {vocab + 7} found" in msg and f"has only {vocab} ids" in msg
    with pytest.raises(DataError, match=f"token id {vocab} found"):
        build_bert_datasets(_write(tmp_path / "edge", [[[1, 2], [vocab, 3]]] * 3), tok, 16,
                            (2, 0, 0), split="1,0,0", cache_dir=str(tmp_path / "c"))


def test_max_token_id_is_recorded_by_preprocess(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                           ["Call me Ishmael.", "It is a truth universally acknowledged."]))
    summary = preprocess([str(src)], bundled.TOKENIZER, str(tmp_path / "out"), append_eod=True,
                         progress=False)
    prefix = summary["prefix"]
    meta = json.load(open(prefix + ".meta.json"))
    assert summary["max_token_id"] == meta["max_token_id"]
    tokens = np.fromfile(prefix + ".bin", dtype=np.uint16)
    assert meta["max_token_id"] == int(tokens.max())
    assert indexed.max_token_id(prefix) == meta["max_token_id"]


def test_max_token_id_is_scanned_once_per_file(tok, tmp_path, monkeypatch):
    scans = []
    real_scan = indexed.scan_max_token_id
    monkeypatch.setattr(indexed, "scan_max_token_id",
                        lambda *a: scans.append(a[0]) or real_scan(*a))
    monkeypatch.setattr(indexed, "_max_id_memo", {})
    monkeypatch.setattr(indexed, "_SCAN_CHUNK", 7)  # several chunks, the max in a later one
    prefix = _write(tmp_path / "foreign", [[[3, 1, 4, 1, 5]], [[9, 2, 6, 5, 3, 5, 8, 97, 9]]] * 3)
    cache = tmp_path / "cache"
    args = (prefix, tok, 4, (5, 0, 0))
    build_gpt_datasets(*args, split="1,0,0", cache_dir=str(cache))
    assert len(scans) == 1
    [stats] = (cache / "token_stats").iterdir()
    assert json.load(open(stats))["max_token_id"] == 97
    # A new process (no memo) reads the cache file, not the .bin.
    monkeypatch.setattr(indexed, "_max_id_memo", {})
    build_gpt_datasets(*args, split="1,0,0", cache_dir=str(cache))
    assert len(scans) == 1
    # A rewritten .bin is scanned again.
    _write(tmp_path / "foreign", [[[3, 1, 4, 1, 5, 98]]] * 6)
    os.utime(prefix + ".bin", ns=(1, 1))
    assert indexed.max_token_id(prefix, str(cache)) == 98 and len(scans) == 2
    # Without a cache dir the value is remembered in the process, and nothing is written.
    assert indexed.max_token_id(prefix) == 98 and len(scans) == 2
    assert sorted(os.listdir(tmp_path)) == ["cache", "foreign.bin", "foreign.idx"]
