"""GPT / BERT datasets over indexed prefixes: samples, splits, blends, cache, resumable loader."""

import json

import numpy as np
import pytest
import torch

from pretrain.data import (
    ResumableBatchSampler,
    build_bert_datasets,
    build_gpt_datasets,
    build_loader,
    load_tokenizer,
    parse_blend,
)
from pretrain.data import bundled
from pretrain.data.preprocess import preprocess
from pretrain.data.readers import DataError
from pretrain.data.tokenizer import train_sentencepiece

pytestmark = pytest.mark.usefixtures("model_parallel_tp1")  # megatron's datasets need a group


@pytest.fixture(scope="module")
def tok(bundled_small):
    return load_tokenizer(bundled_small["tokenizer"])


@pytest.fixture(scope="module")
def second_prefix(tmp_path_factory):
    """A second GPT prefix from other bundled documents (Shakespeare/Milton), for blends."""
    d = tmp_path_factory.mktemp("second")
    docs = [doc for doc in bundled.shakespeare_milton_documents()][:6]
    src = d / "sm.jsonl"
    src.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return preprocess([str(src)], bundled.TOKENIZER, str(d / "sm"), append_eod=True,
                      progress=False)["prefix"]


def _stream(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return {i: ds[i].tolist() for i in range(len(ds))}


def _contains(haystack, needle):
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def test_gpt_samples_come_from_the_documents(bundled_small, tok, tmp_path):
    train, valid, test = build_gpt_datasets(bundled_small["gpt"], tok, seq_length=64,
                                            num_samples=(100, 10, 10), split="8,1,1",
                                            cache_dir=str(tmp_path))
    assert len(train) >= 100 and len(valid) >= 10 and len(test) >= 10
    sample = train[3]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert sample["tokens"].shape == (64,) and sample["tokens"].dtype == torch.int64
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert torch.equal(sample["position_ids"], torch.arange(64))
    assert sample["loss_mask"].sum() == 64
    # The 65-token window is a contiguous run of the concatenated training documents.
    docs = _stream(bundled_small["gpt"])
    window = sample["tokens"].tolist() + sample["labels"][-1:].tolist()
    used = train._query_document_sample_shuffle_indices(3)[1]
    joined = sum((docs[int(d)] for d in used), [])
    assert _contains(joined, window)
    # Splits are made of disjoint documents that together cover the prefix.
    parts = [set(ds.indices.tolist()) for ds in (train, valid, test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(docs)


def test_document_masks_and_eod_loss_mask(bundled_small, tok, tmp_path):
    train, _, _ = build_gpt_datasets(bundled_small["gpt"], tok, 256, (50, 0, 0), split="1,0,0",
                                     cache_dir=str(tmp_path), reset_position_ids=True,
                                     reset_attention_mask=True, eod_mask_loss=True)
    for i in range(len(train)):
        s = train[i]
        eods = (s["tokens"] == tok.eod).nonzero().flatten()
        if len(eods) and eods[0] < 255:
            break
    else:
        pytest.fail("no sample crosses a document boundary")
    e = int(eods[0])
    assert s["attention_mask"].shape == (1, 256, 256)
    assert s["loss_mask"][e] == 0 and s["position_ids"][e + 1] == 0
    assert bool(s["attention_mask"][0, e + 1, e])  # True = masked: no attention across documents


def test_weighted_blend(bundled_small, second_prefix, tok, tmp_path):
    train, valid, _ = build_gpt_datasets(["0.8", bundled_small["gpt"], "0.2", second_prefix], tok,
                                         seq_length=64, num_samples=(400, 40, 0), split="9,1,0",
                                         cache_dir=str(tmp_path))
    assert len(train) == 400 and len(valid) == 40
    share = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert abs(share[0] - 0.8) < 0.02 and abs(share[1] - 0.2) < 0.02
    assert train[0]["tokens"].shape == (64,)
    with pytest.raises(DataError, match="sample count for every split"):
        build_gpt_datasets(["1", bundled_small["gpt"], "1", second_prefix], tok, 64,
                           (None, 10, 10), cache_dir=str(tmp_path))


def test_indices_are_cached_and_reused(bundled_small, tok, tmp_path):
    cache = tmp_path / "cache"
    args = dict(seq_length=64, num_samples=(100, 10, 10), split="8,1,1", cache_dir=str(cache))
    first, _, _ = build_gpt_datasets(bundled_small["gpt"], tok, **args)
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    assert len(files) >= 9  # document/sample/shuffle indices for 3 splits
    again, _, _ = build_gpt_datasets(bundled_small["gpt"], tok, **args)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == files
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(5))
    other, _, _ = build_gpt_datasets(bundled_small["gpt"], tok, **{**args, "split": "7,2,1"})
    assert len(list(cache.rglob("*.npy"))) > len(files)
    seeded, _, _ = build_gpt_datasets(bundled_small["gpt"], tok, seed=99, **args)
    assert not torch.equal(seeded[0]["tokens"], first[0]["tokens"])


def test_loader_resumes_at_any_sample(bundled_small, tok, tmp_path):
    train, _, _ = build_gpt_datasets(bundled_small["gpt"], tok, 32, (200, 0, 0), split="1,0,0",
                                     cache_dir=str(tmp_path))
    full = [b["tokens"] for _, b in zip(range(10), build_loader(train, micro_batch_size=4))]
    resumed = [b["tokens"] for _, b in zip(range(4), build_loader(train, 4, consumed_samples=24))]
    assert all(torch.equal(a, b) for a, b in zip(full[6:], resumed))
    # Mid-batch positions work too: the stream is indexed by sample, not by step.
    odd = next(iter(build_loader(train, 4, consumed_samples=5)))["tokens"]
    assert torch.equal(odd[:3], full[1][1:]) and torch.equal(odd[3], full[2][0])
    # Two data-parallel ranks split every global batch of 8 samples between them.
    r0 = next(iter(build_loader(train, 4, data_parallel_rank=0, data_parallel_size=2)))["tokens"]
    r1 = next(iter(build_loader(train, 4, data_parallel_rank=1, data_parallel_size=2)))["tokens"]
    assert torch.equal(torch.cat([r0, r1]), torch.cat(full[:2]))


def test_batch_sampler_arithmetic():
    # Global steps of 6 samples from sample 4: [4, 10) [10, 16) and a partial [16, 21).
    s = ResumableBatchSampler(total_samples=21, micro_batch_size=3, consumed_samples=4,
                              data_parallel_rank=1, data_parallel_size=2)
    assert list(s) == [[7, 8, 9], [13, 14, 15]] and len(s) == 2
    keep = ResumableBatchSampler(21, 3, 4, 1, 2, drop_last=False)
    assert list(keep) == [[7, 8, 9], [13, 14, 15], [19, 20]] and len(keep) == 3
    with pytest.raises(ValueError):
        ResumableBatchSampler(10, 2, consumed_samples=11)


def test_bert_samples(bundled_small, tok, tmp_path):
    train, valid, _ = build_bert_datasets(bundled_small["bert"], tok, seq_length=64,
                                          num_samples=(200, 20, 0), split="9,1,0",
                                          cache_dir=str(tmp_path))
    assert len(train) >= 200 and len(valid) >= 20
    seen_random, mask_shown, masked_total = set(), 0, 0
    for i in range(40):
        s = train[i]
        text, types, labels = s["text"], s["types"], s["labels"]
        n = int(s["padding_mask"].sum())
        assert text[0] == tok.cls and (text[:n] == tok.sep).sum() == 2 and text[n - 1] == tok.sep
        assert (text[n:] == 0).all() and (s["padding_mask"][:n] == 1).all()
        # Segment A is type 0, segment B (after the first [SEP]) type 1.
        first_sep = int(np.flatnonzero(text == tok.sep)[0])
        assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1:n] == 1).all()
        masked = s["loss_mask"] == 1
        assert (labels[masked] >= 0).all() and (labels[~masked] == -1).all()
        # megatron masks 15% of the target length, rounded down: very short samples (drawn
        # with short_sequence_probability) may have no masked token at all.
        assert masked.sum() >= 1 or n < 10
        mask_shown += int((text[masked] == tok.mask).sum())
        masked_total += int(masked.sum())
        seen_random.add(int(s["is_random"]))
    assert seen_random == {0, 1}
    assert 0.7 < mask_shown / masked_total < 0.9  # 80% [MASK], 10% random, 10% unchanged
    batch = next(iter(build_loader(train, 4)))
    assert batch["text"].shape == (4, 64) and batch["is_random"].shape == (4,)


def test_bad_inputs_are_clear_errors(bundled_small, tok, tmp_path):
    with pytest.raises(DataError, match="no .bin/.idx files"):
        build_gpt_datasets(str(tmp_path / "nothing"), tok, 64, (10, 1, 1))
    other_path = train_sentencepiece(
        (d["text"] for d in bundled_small["docs"][:5]), str(tmp_path / "other"), vocab_size=500)
    other = load_tokenizer(other_path)
    with pytest.raises(DataError, match="tokenized with a different tokenizer"):
        build_gpt_datasets(bundled_small["gpt"], other, 64, (10, 1, 1), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="BERT needs a tokenizer"):
        build_bert_datasets(bundled_small["bert"], other, 64, (10, 1, 1), cache_dir=str(tmp_path))


def test_parse_blend():
    assert parse_blend("a") == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    assert parse_blend([1, "a", 2, "b"]) == (["a", "b"], [1.0, 2.0])
    for bad in ([], ["0.3", "a", "0.7"], ["0.5", "0.5"], ["-1", "a"]):
        with pytest.raises(DataError):
            parse_blend(bad)


@pytest.mark.slow
def test_bundled_prepare_builds_then_reuses(tmp_path):
    """tools/prepare_corpus.py's engine on the whole bundled corpus (~15 s)."""
    prefixes = bundled.prepare(str(tmp_path), workers=2)
    assert set(prefixes) == {"gpt", "gpt_heldout", "bert"}
    meta = json.load(open(prefixes["gpt"] + ".meta.json"))
    assert meta["documents"] == len(bundled.training_documents()) and meta["tokens"] > 2_500_000
    assert meta["corpus_layout"] == bundled.CORPUS_LAYOUT
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert bundled.prepare(str(tmp_path)) == prefixes
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    # outputs of another corpus layout (e.g. an older checkout's cache) are rebuilt
    meta_path = prefixes["gpt"] + ".meta.json"
    json.dump(dict(meta, corpus_layout="whole-documents-in-file-order"), open(meta_path, "w"))
    (tmp_path / "index_cache").mkdir()  # sample indices built on the old data must go with it
    bundled.prepare(str(tmp_path))
    assert json.load(open(meta_path))["corpus_layout"] == bundled.CORPUS_LAYOUT
    assert not (tmp_path / "index_cache").exists()


def test_training_documents_are_shuffled_pieces_of_the_whole_text():
    docs = bundled.training_documents()
    assert docs == bundled.training_documents()  # a fixed order
    assert all(0 < len(d["text"]) <= bundled.PIECE_CHARS for d in docs)
    # every piece of a document, in order, gives back its text (up to the whitespace at the cuts)
    squash = lambda t: "".join(t.split())  # noqa: E731
    by_title = {}
    for d in docs:
        base, _, part = d["title"].rpartition("/part-")
        key = base if part.isdigit() else d["title"]
        by_title.setdefault(key, []).append((int(part) if part.isdigit() else 0, d["text"]))
    whole = {d["title"]: d["text"] for d in bundled.corpus_documents("train")}
    assert set(by_title) == set(whole)
    for title, parts in by_title.items():
        assert squash("".join(t for _, t in sorted(parts))) == squash(whole[title]), title
    # Megatron's "98,1,1" split takes consecutive documents: in the shuffled order the 1%
    # validation share mixes the authors (in file order it was three Milton poems).
    n = len(docs)
    valid = docs[round(0.98 * n): round(0.98 * n) + round(0.01 * n)]
    assert {d["title"].split("/")[0] for d in valid} == {"austen", "shakespeare_milton"}
