"""Write Megatron's indexed dataset format (.bin + .idx), read by megatron.core's IndexedDataset.

Format (all little-endian), as megatron-core 0.16 reads it:

    .bin  the token ids of every sequence, back to back, in the index's dtype
    .idx  b"MMIDIDX\\x00\\x00"      magic
          u64 1                     version
          u8  dtype code            (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                     7 float32, 8 uint16)
          u64 S                     number of sequences
          u64 D+1                   length of the document index
          i32[S]                    tokens per sequence
          i64[S]                    byte offset of each sequence in .bin
          i64[D+1]                  document index: 0, then the sequence count at each
                                    document's end

A "sequence" is a whole document (GPT) or a sentence (BERT, ``--split-sentences``).

Outputs are written to temporary files and renamed into place only when complete, so a failure
leaves what was there before untouched. A ``<prefix>.meta.json`` sidecar records the tokenizer
(sha256) so that training can refuse data tokenized with a different one, and the largest token
id (``max_token_id``) so that it can refuse ids the model's embedding has no row for without
reading the .bin again.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from pretrain.data.readers import DataError

_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                np.float64: 6, np.float32: 7, np.uint16: 8}
_CODE_DTYPES = {code: np.dtype(t) for t, code in _DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document index length


def token_dtype(vocab_size: int):
    """uint16 when every id fits (Megatron uses the same cut-off), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Streams documents into ``<prefix>.bin`` and writes ``<prefix>.idx`` on ``finalize``."""

    def __init__(self, prefix: str, dtype=np.uint16):
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported dtype {dtype}")
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._tmp = f".tmp-{os.getpid()}"
        self._bin = open(prefix + ".bin" + self._tmp, "wb")
        self._lengths: List[int] = []
        self._doc_index: List[int] = [0]
        self.num_tokens = 0
        self.max_token_id: Optional[int] = None

    @property
    def num_documents(self) -> int:
        return len(self._doc_index) - 1

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    def add_document(self, sequences: Sequence[Sequence[int]]) -> None:
        """One document made of one or more sequences (sentences)."""
        for seq in sequences:
            arr = np.asarray(seq, dtype=np.int64)
            if arr.size:
                top = int(arr.max())
                if arr.min() < 0 or top > np.iinfo(self.dtype).max:
                    raise ValueError(f"token id out of range for {self.dtype}")
                if self.max_token_id is None or top > self.max_token_id:
                    self.max_token_id = top
            self._bin.write(arr.astype(self.dtype).tobytes(order="C"))
            self._lengths.append(int(arr.size))
            self.num_tokens += int(arr.size)
        self._doc_index.append(len(self._lengths))

    def finalize(self, metadata: Optional[Dict] = None) -> None:
        """Write the index, then move .bin, .idx (and .meta.json, with ``max_token_id``) into place."""
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * self.dtype.itemsize
        with open(self.prefix + ".idx" + self._tmp, "wb") as f:
            f.write(_MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype.type]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self._doc_index)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self._doc_index, dtype=np.int64).tobytes(order="C"))
        if metadata is not None:
            metadata = {**metadata, "max_token_id": self.max_token_id}
            with open(self.prefix + ".meta.json" + self._tmp, "w") as f:
                json.dump(metadata, f, indent=2, sort_keys=True)
        os.replace(self.prefix + ".bin" + self._tmp, self.prefix + ".bin")
        os.replace(self.prefix + ".idx" + self._tmp, self.prefix + ".idx")
        if metadata is not None:
            os.replace(self.prefix + ".meta.json" + self._tmp, self.prefix + ".meta.json")

    def abort(self) -> None:
        """Drop the temporary files; the previous outputs (if any) stay as they were."""
        self._bin.close()
        for ext in (".bin", ".idx", ".meta.json"):
            try:
                os.remove(self.prefix + ext + self._tmp)
            except FileNotFoundError:
                pass


def read_metadata(prefix: str) -> Optional[Dict]:
    """The sidecar written by our preprocessing, or None (e.g. data made by Megatron-LM)."""
    path = prefix + ".meta.json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def prefix_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


class IndexFile(NamedTuple):
    """What a ``.idx`` says about its ``.bin`` (arrays are read-only memory maps)."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32, tokens per sequence
    document_indices: np.ndarray  # int64, 0 then the sequence count at each document's end


def read_index(prefix: str) -> IndexFile:
    """Parse ``<prefix>.idx`` (ours or Megatron-LM's) without touching the ``.bin``."""
    path = prefix + ".idx"
    with open(path, "rb") as f:
        header = f.read(_HEADER.size)
    if len(header) < _HEADER.size or header[:len(_MAGIC)] != _MAGIC:
        raise DataError(f"{path}: not a Megatron index file")
    _, version, code, num_sequences, num_doc_index = _HEADER.unpack(header)
    if version != 1 or code not in _CODE_DTYPES:
        raise DataError(f"{path}: unsupported index (version {version}, dtype code {code})")
    lengths_at = _HEADER.size
    doc_index_at = lengths_at + num_sequences * (4 + 8)
    if os.path.getsize(path) < doc_index_at + num_doc_index * 8:
        raise DataError(f"{path}: truncated index ({num_sequences} sequences announced)")

    def view(dtype, offset, count):
        # np.memmap refuses zero-length maps.
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))

    return IndexFile(_CODE_DTYPES[code], view(np.int32, lengths_at, num_sequences),
                     view(np.int64, doc_index_at, num_doc_index))


# Elements per read while scanning a .bin: large enough that numpy's per-call cost vanishes,
# small enough that the working set stays a few tens of MB whatever the file size.
_SCAN_CHUNK = 1 << 24
_max_id_memo: Dict[tuple, Optional[int]] = {}


def scan_max_token_id(bin_path: str, dtype) -> Optional[int]:
    """The largest id in a ``.bin`` (None when it holds no tokens): one sequential pass."""
    dtype = np.dtype(dtype)
    count = os.path.getsize(bin_path) // dtype.itemsize
    if count == 0:
        return None
    data = np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,))
    top = None
    for start in range(0, count, _SCAN_CHUNK):
        value = data[start:start + _SCAN_CHUNK].max()
        top = value if top is None or value > top else top
    return int(top)


def _stats_path(cache_dir: str, bin_path: str) -> str:
    # One file per .bin (not per version): a rewritten .bin replaces its entry.
    name = hashlib.sha256(bin_path.encode("utf-8")).hexdigest()[:32]
    return os.path.join(cache_dir, "token_stats", name + ".json")


def max_token_id(prefix: str, cache_dir: Optional[str] = None) -> Optional[int]:
    """The largest token id of a prefix, read once per ``.bin``.

    Our writer records it in the sidecar. Other data (e.g. from Megatron-LM) is scanned once and
    the result kept in ``<cache_dir>/token_stats/`` keyed by the ``.bin``'s path, size and mtime
    (never next to the data, which may be read-only or shared); without ``cache_dir`` it is only
    remembered for the life of this process.
    """
    meta = read_metadata(prefix)
    if meta is not None and "max_token_id" in meta:
        return meta["max_token_id"]
    bin_path = os.path.realpath(prefix + ".bin")
    st = os.stat(bin_path)
    key = (bin_path, st.st_size, st.st_mtime_ns)
    if key in _max_id_memo:
        return _max_id_memo[key]
    stamp = {"bin": bin_path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cached = None
    if cache_dir is not None:
        path = _stats_path(cache_dir, bin_path)
        try:
            with open(path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = None
    if cached is not None and all(cached.get(k) == v for k, v in stamp.items()):
        value = cached.get("max_token_id")
    else:
        value = scan_max_token_id(bin_path, read_index(prefix).dtype)
        if cache_dir is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Ranks (on several hosts) may scan the same file at once: each writes its own
            # temporary file, then renames.
            tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
            with open(tmp, "w") as f:
                json.dump({**stamp, "max_token_id": value}, f)
            os.replace(tmp, path)
    _max_id_memo[key] = value
    return value
