"""Read documents from jsonl / txt / parquet files (optionally gzip-compressed).

One reader serves both tokenizer training and preprocessing, so both see the same documents.
Problems with the input raise ``DataError`` whose message is one line naming the file (and line
or row); command-line tools print it as ``error: ...``.

Formats, chosen by file name:
- ``.jsonl`` / ``.json`` (+ ``.gz``): one JSON object per line, the text under ``text_key``.
- ``.txt`` (+ ``.gz``): ``txt_mode`` says what a document is: ``document`` (the whole file),
  ``paragraph`` (blocks separated by blank lines) or ``line`` (each non-empty line).
- ``.parquet``: read with HF ``datasets`` (offline), the text in column ``text_key``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from typing import Iterator, List, Sequence, Tuple

from pretrain.errors import UserError

TXT_MODES = ("document", "paragraph", "line")


class DataError(UserError, ValueError):
    """Bad input data; the message is a single line fit for ``error: <message>``."""


def input_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".txt", "txt"),
                     (".parquet", "parquet")):
        if name.endswith(ext):
            if fmt == "parquet" and path.endswith(".gz"):
                break
            return fmt
    raise DataError(f"{path}: unsupported input type (use .jsonl, .json, .txt, .parquet; .gz for text)")


def check_inputs(paths: Sequence[str]) -> List[str]:
    """Expand directories (their supported files, sorted) and fail early on missing files."""
    if not paths:
        raise DataError("no input files given")
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if not os.path.isfile(full):
                    continue
                try:
                    input_format(full)
                except DataError:
                    continue
                found.append(full)
            if not found:
                raise DataError(f"{path}: directory holds no .jsonl/.json/.txt/.parquet files")
            files.extend(found)
        elif not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        else:
            input_format(path)
            files.append(path)
    return files


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _iter_jsonl(path: str, text_key: str) -> Iterator[Tuple[str, str]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if text_key not in record:
                keys = ", ".join(sorted(record)) or "none"
                raise DataError(f"{where}: no {text_key!r} key (keys: {keys}); set --json-key")
            text = record[text_key]
            if not isinstance(text, str):
                raise DataError(f"{where}: {text_key!r} is {type(text).__name__}, not a string")
            yield where, text


def _iter_txt(path: str, txt_mode: str) -> Iterator[Tuple[str, str]]:
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt mode must be one of {TXT_MODES}, got {txt_mode!r}")
    with _open_text(path) as f:
        if txt_mode == "document":
            yield path, f.read()
        elif txt_mode == "line":
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{lineno}", line.rstrip("\n")
        else:
            for i, block in enumerate(re.split(r"\n\s*\n", f.read())):
                if block.strip():
                    yield f"{path}#paragraph{i}", block.strip("\n")


def _iter_parquet(path: str, text_key: str) -> Iterator[Tuple[str, str]]:
    # HF datasets must not try the hub: this runs offline.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
        columns = ds.column_names
    except Exception as e:  # pyarrow / datasets raise many types for unreadable files
        raise DataError(f"{path}: cannot read parquet ({_one_line(e)})") from None
    if columns is not None and text_key not in columns:
        raise DataError(f"{path}: no {text_key!r} column (columns: {', '.join(columns)}); set --json-key")
    for row, record in enumerate(ds):
        text = record.get(text_key)
        if not isinstance(text, str):
            raise DataError(f"{path}#row{row}: {text_key!r} is {type(text).__name__}, not a string")
        yield f"{path}#row{row}", text


def iter_documents(
    paths: Sequence[str],
    text_key: str = "text",
    txt_mode: str = "document",
    skip_empty: bool = False,
) -> Iterator[Tuple[str, str]]:
    """Yield ``(location, text)`` for every document of every file, in order.

    An empty (whitespace-only) document is an error unless ``skip_empty``: silently dropping
    documents would hide broken inputs.
    """
    for path in check_inputs(paths):
        fmt = input_format(path)
        if fmt == "jsonl":
            docs = _iter_jsonl(path, text_key)
        elif fmt == "txt":
            docs = _iter_txt(path, txt_mode)
        else:
            docs = _iter_parquet(path, text_key)
        try:
            for where, text in docs:
                if not text.strip():
                    if skip_empty:
                        continue
                    raise DataError(f"{where}: empty document (pass --skip-empty to drop such documents)")
                yield where, text
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
