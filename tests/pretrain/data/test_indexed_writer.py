"""The Megatron indexed-data writer (pretrain/data/indexed.py): what it writes is read back the
same by the format as documented (parsed here with struct), by the project's index reader, and by
megatron-core's IndexedDataset; dtype choice; atomic replacement; the metadata sidecar."""
import json
import os
import struct

import numpy as np
import pytest

from pretrain.data.indexed import (
    IndexedDatasetWriter,
    max_token_id,
    prefix_exists,
    read_index,
    read_metadata,
    token_dtype,
)

# Documents as lists of sequences (a GPT document is one sequence, a BERT one a list of
# sentences); an empty sentence and a one-token document included.
DOCS = [
    [[5, 6, 7, 8]],
    [[1, 2], [3], [9, 10, 11]],
    [[42]],
    [[0, 0, 7], [], [13, 14]],
]
CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}


def _write(prefix, docs, dtype=np.uint16, metadata=None):
    w = IndexedDatasetWriter(str(prefix), dtype)
    for doc in docs:
        w.add_document(doc)
    w.finalize(metadata)
    return w


def _sequences(docs):
    return [list(s) for doc in docs for s in doc]


def _document_index(docs):
    out = [0]
    for doc in docs:
        out.append(out[-1] + len(doc))
    return out


def _parse_idx(path):
    """The .idx as the module docstring lays it out, little-endian."""
    raw = open(path, "rb").read()
    magic, version, code, n_seq, n_doc = struct.unpack_from("<9sQBQQ", raw, 0)
    at = 9 + 8 + 1 + 8 + 8
    lengths = list(struct.unpack_from(f"<{n_seq}i", raw, at))
    at += 4 * n_seq
    pointers = list(struct.unpack_from(f"<{n_seq}q", raw, at))
    at += 8 * n_seq
    doc_index = list(struct.unpack_from(f"<{n_doc}q", raw, at))
    at += 8 * n_doc
    assert at == len(raw), "bytes after the document index"
    return dict(magic=magic, version=version, code=code, lengths=lengths, pointers=pointers,
                doc_index=doc_index)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_index_bytes_follow_the_documented_layout(tmp_path, dtype):
    prefix = tmp_path / "d"
    _write(prefix, DOCS, dtype)
    idx = _parse_idx(str(prefix) + ".idx")
    seqs = _sequences(DOCS)
    size = np.dtype(dtype).itemsize
    assert idx["magic"] == b"MMIDIDX\x00\x00" and idx["version"] == 1 and idx["code"] == CODES[dtype]
    assert idx["lengths"] == [len(s) for s in seqs]
    # Each sequence starts where the previous ones' tokens end, in bytes.
    assert idx["pointers"] == [size * sum(len(s) for s in seqs[:i]) for i in range(len(seqs))]
    assert idx["doc_index"] == [0, 1, 4, 5, 8]
    flat = [t for s in seqs for t in s]
    little = np.dtype(dtype).newbyteorder("<")
    assert open(str(prefix) + ".bin", "rb").read() == np.asarray(flat, dtype=little).tobytes()


def test_project_reader_and_megatron_read_the_same_documents(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(tmp_path / "d")
    w = _write(prefix, DOCS)
    seqs = _sequences(DOCS)
    assert (w.num_documents, w.num_sequences, w.num_tokens) == (4, 8, sum(map(len, seqs)))
    assert prefix_exists(prefix)

    index = read_index(prefix)
    assert index.dtype == np.uint16
    assert index.sequence_lengths.tolist() == [len(s) for s in seqs]
    assert index.document_indices.tolist() == _document_index(DOCS)
    bin_tokens = np.fromfile(prefix + ".bin", dtype=index.dtype)
    ends = np.cumsum(index.sequence_lengths)
    assert [part.tolist() for part in np.split(bin_tokens, ends[:-1])] == seqs

    ds = IndexedDataset(prefix)
    assert ds.index.dtype == np.uint16 and len(ds) == len(seqs)
    assert [ds[i].tolist() for i in range(len(ds))] == seqs
    assert ds.document_indices.tolist() == _document_index(DOCS)
    assert ds.sequence_lengths.tolist() == [len(s) for s in seqs]
    # Documents regrouped from megatron's document index are the documents written.
    di = ds.document_indices
    assert [[ds[i].tolist() for i in range(di[d], di[d + 1])] for d in range(len(DOCS))] == DOCS
    assert ds.get(3, offset=1, length=2).tolist() == [10, 11]


def test_large_vocabulary_ids_round_trip_in_int32(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    vocab = 250_000
    dtype = token_dtype(vocab)
    assert np.dtype(dtype) == np.int32
    docs = [[[0, 65_535, 65_536, vocab - 1]], [[123_456], [7]]]
    prefix = str(tmp_path / "big")
    _write(prefix, docs, dtype)
    ds = IndexedDataset(prefix)
    assert ds.index.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == _sequences(docs)
    assert read_index(prefix).dtype == np.int32


def test_dtype_choice_matches_megatron():
    from megatron.core.datasets.indexed_dataset import DType

    # uint16 holds ids 0..65535; Megatron keeps a margin and switches to int32 at 65500.
    for vocab in (2, 8192, 50_257, 65_499, 65_500, 65_536, 250_000):
        assert np.dtype(token_dtype(vocab)) == np.dtype(DType.optimal_dtype(vocab)), vocab
    assert np.dtype(token_dtype(65_499)) == np.uint16
    assert np.dtype(token_dtype(65_500)) == np.int32


@pytest.mark.parametrize("bad", [[65_536], [-1], [3, 70_000]])
def test_ids_the_dtype_cannot_hold_are_refused(tmp_path, bad):
    w = IndexedDatasetWriter(str(tmp_path / "d"), np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        w.add_document([bad])
    w.abort()


def test_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported dtype"):
        IndexedDatasetWriter(str(tmp_path / "d"), np.uint32)
    assert os.listdir(tmp_path) == []


def test_outputs_appear_only_when_complete_and_abort_keeps_the_old_ones(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix, DOCS[:2], metadata={"tokenizer_sha256": "old"})
    before = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx", ".meta.json")}

    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document([[99, 98, 97]])
    # Still the previous outputs until finalize: a reader now sees the old data.
    assert {ext: open(prefix + ext, "rb").read() for ext in before} == before
    w.abort()
    assert {ext: open(prefix + ext, "rb").read() for ext in before} == before
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx", "d.meta.json"]  # no temporaries left

    fresh = str(tmp_path / "fresh")
    w = IndexedDatasetWriter(fresh, np.uint16)
    w.add_document([[1, 2, 3]])
    assert not prefix_exists(fresh)
    w.finalize()
    assert prefix_exists(fresh)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("fresh")) == ["fresh.bin", "fresh.idx"]


def test_metadata_sidecar_records_what_was_given_and_the_largest_id(tmp_path):
    prefix = str(tmp_path / "d")
    w = _write(prefix, DOCS, metadata={"tokenizer_sha256": "abc", "documents": 4})
    top = max(t for s in _sequences(DOCS) for t in s)
    assert top == 42 and w.max_token_id == top
    meta = read_metadata(prefix)
    assert meta == json.load(open(prefix + ".meta.json"))
    assert meta == {"tokenizer_sha256": "abc", "documents": 4, "max_token_id": top}
    assert max_token_id(prefix) == top

    # Without metadata there is no sidecar (as with data from Megatron-LM): the largest id is
    # then found in the .bin itself.
    other = str(tmp_path / "plain")
    _write(other, DOCS)
    assert read_metadata(other) is None and not os.path.exists(other + ".meta.json")
    assert max_token_id(other) == top
    assert max_token_id(other, cache_dir=str(tmp_path / "cache")) == top


def test_a_dataset_without_tokens(tmp_path):
    # megatron-core cannot open this one (it memory-maps the empty .bin); the index is still valid.
    prefix = str(tmp_path / "empty")
    w = _write(prefix, [[[]]], metadata={})
    assert (w.num_documents, w.num_sequences, w.num_tokens, w.max_token_id) == (1, 1, 0, None)
    assert os.path.getsize(prefix + ".bin") == 0
    assert read_metadata(prefix) == {"max_token_id": None}
    assert _parse_idx(prefix + ".idx")["doc_index"] == [0, 1]
    index = read_index(prefix)
    assert index.sequence_lengths.tolist() == [0] and index.document_indices.tolist() == [0, 1]
    assert max_token_id(str(tmp_path / "empty")) is None
