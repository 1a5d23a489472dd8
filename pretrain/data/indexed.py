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
(sha256) so that training can refuse data tokenized with a different one.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, List, Optional, Sequence

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                np.float64: 6, np.float32: 7, np.uint16: 8}


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
            if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
                raise ValueError(f"token id out of range for {self.dtype}")
            self._bin.write(arr.astype(self.dtype).tobytes(order="C"))
            self._lengths.append(int(arr.size))
            self.num_tokens += int(arr.size)
        self._doc_index.append(len(self._lengths))

    def finalize(self, metadata: Optional[Dict] = None) -> None:
        """Write the index, then move .bin, .idx (and .meta.json) into place."""
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
