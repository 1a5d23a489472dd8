"""SentencePiece tokenizer: training, and the runtime wrapper the datasets and tools use.

Fixed special-token ids, so every model trained here agrees on them:

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos, used as GPT's end-of-document)
    4 [CLS]   5 [SEP]   6 [MASK]      (only when trained with BERT special tokens)

BERT's special tokens are *control* symbols: the encoder never produces them from raw text, so a
literal "[SEP]" in a document stays text. <pad> is 0 because megatron's BERT dataset pads token
types and the padding mask with the pad id, which only works when it is 0.

Training uses identity normalization, keeps whitespace as is and falls back to bytes for
characters outside the vocabulary, so ``decode(encode(text)) == text`` for any text.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import sentencepiece as spm

from pretrain.data.readers import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
BERT_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]")
# sentencepiece drops longer training "sentences"; we cut lines to stay under its limit.
_MAX_SENTENCE_BYTES = 4096


def _training_sentences(documents: Iterable[str], max_sentences: Optional[int]) -> Iterator[str]:
    """Lines of the documents, as sentencepiece training sentences (it learns from lines)."""
    count = 0
    for text in documents:
        for line in text.split("\n"):
            if not line.strip():
                continue
            while line:
                # Cut on characters, then check bytes: multibyte text may need a shorter cut.
                piece = line[:_MAX_SENTENCE_BYTES]
                while len(piece.encode("utf-8")) > _MAX_SENTENCE_BYTES:
                    piece = piece[: len(piece) // 2]
                line = line[len(piece):]
                yield piece
                count += 1
                if max_sentences is not None and count >= max_sentences:
                    return


def train_sentencepiece(
    documents: Iterable[str],
    output_prefix: str,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    bert_special_tokens: bool = False,
    byte_fallback: bool = True,
    character_coverage: float = 0.9999,
    max_sentences: Optional[int] = 2_000_000,
    num_threads: int = 1,
) -> str:
    """Train a sentencepiece model from document texts; write ``<output_prefix>.model`` and
    ``.vocab``. Returns the .model path. Deterministic for the same inputs and options."""
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model type must be 'bpe' or 'unigram', got {model_type!r}")
    control = list(BERT_SPECIAL_TOKENS) if bert_special_tokens else []
    min_vocab = 4 + len(control) + (256 if byte_fallback else 0) + 1
    if vocab_size < min_vocab:
        raise DataError(f"vocab size {vocab_size} is too small (at least {min_vocab} with these options)")
    sentences = _training_sentences(documents, max_sentences)
    first = next(sentences, None)
    if first is None:
        raise DataError("no text to train the tokenizer on")

    def all_sentences():
        yield first
        yield from sentences

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            control_symbols=control,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            # We already sampled at most max_sentences; no second random sampling inside.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError("sentencepiece training failed: " + " ".join(str(e).split())) from None
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    proto = model.getvalue()
    model_path = output_prefix + ".model"
    _atomic_write(model_path, proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab_lines = "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())
    )
    _atomic_write(output_prefix + ".vocab", vocab_lines.encode("utf-8"))
    return model_path


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class SentencePieceTokenizer:
    """A trained sentencepiece model with the attributes megatron-core's datasets read
    (``vocab_size``, ``eod``, ``pad``, ``cls``, ``sep``, ``mask``, ``inv_vocab``,
    ``unique_identifiers``). Picklable (for DataLoader workers)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise DataError(f"{model_path}: no such tokenizer model")
        with open(model_path, "rb") as f:
            proto = f.read()
        self._load(model_path, proto)

    def _load(self, model_path: str, proto: bytes) -> None:
        self.model_path = model_path
        self._proto = proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, TypeError, OSError):
            raise DataError(f"{model_path}: not a sentencepiece model") from None
        self.sha256 = hashlib.sha256(proto).hexdigest()
        expected = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
        for i, piece in expected.items():
            if self._sp.get_piece_size() <= i or self._sp.id_to_piece(i) != piece:
                raise DataError(
                    f"{model_path}: special tokens do not match this project's layout "
                    "(0 <pad>, 1 <unk>, 2 <s>, 3 </s>); train it with tools/train_tokenizer.py"
                )
        self._inv_vocab: Optional[Dict[int, str]] = None
        self.unique_identifiers = {"class": type(self).__name__, "model_sha256": self.sha256}

    def __getstate__(self):
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state):
        self._load(state["model_path"], state["proto"])

    # --- sizes and special ids ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    pad = property(lambda self: PAD_ID)
    unk = property(lambda self: UNK_ID)
    bos = property(lambda self: BOS_ID)
    eos = property(lambda self: EOS_ID)
    # Megatron calls the end-of-document token "eod"; it is </s>.
    eod = property(lambda self: EOS_ID)

    @property
    def has_bert_tokens(self) -> bool:
        return all(self._sp.piece_to_id(t) != UNK_ID for t in BERT_SPECIAL_TOKENS)

    def _special(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if i == UNK_ID:
            raise DataError(
                f"{self.model_path}: tokenizer has no {piece} token; train it with "
                "--bert-special-tokens for BERT"
            )
        return i

    cls = property(lambda self: self._special("[CLS]"))
    sep = property(lambda self: self._special("[SEP]"))
    mask = property(lambda self: self._special("[MASK]"))

    # --- text <-> ids -------------------------------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def vocab(self) -> Dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> Dict[int, str]:
        """id -> piece in WordPiece spelling, for megatron's whole-word masking.

        megatron's masked datasets treat a piece starting with "##" as the continuation of a word.
        sentencepiece marks the opposite (a word *start* carries "▁"), so continuation pieces are
        reported here as "##piece". Byte-fallback pieces always continue a word (a word that
        starts with an unknown character begins with a bare "\u2581" piece); control pieces stay
        as they are.
        """
        if self._inv_vocab is None:
            inv = {}
            for i in range(self.vocab_size):
                piece = self._sp.id_to_piece(i)
                plain = self._sp.is_control(i) or self._sp.is_unknown(i)
                inv[i] = piece if plain or piece.startswith("\u2581") else "##" + piece
            self._inv_vocab = inv
        return self._inv_vocab

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face tokenizer read from local files, with the attributes of
    ``SentencePieceTokenizer`` that preprocessing, the datasets and the trainer use. Two sources,
    as Megatron-LM's ``--tokenizer-type``: ``GPT2BPETokenizer`` (a ``vocab.json`` and a
    ``merges.txt``) and ``HuggingFaceTokenizer`` (a saved tokenizer directory). The end-of-document
    token is the tokenizer's eos (GPT-2's ``<|endoftext|>``). Picklable (for worker processes)."""

    def __init__(self, path: str, vocab_file: Optional[str] = None, merge_file: Optional[str] = None):
        self.model_path = path
        self._files = (vocab_file, merge_file)
        self._load()

    def _load(self) -> None:
        vocab_file, merge_file = self._files
        try:
            if vocab_file is not None:
                import transformers
                from transformers import GPT2TokenizerFast

                # transformers 5 names the two files vocab= and merges= (4.x: vocab_file=,
                # merges_file=; 5.x ignores those and builds an empty tokenizer).
                if int(transformers.__version__.split(".")[0]) >= 5:
                    files = dict(vocab=vocab_file, merges=merge_file)
                else:
                    files = dict(vocab_file=vocab_file, merges_file=merge_file)
                # split_special_tokens: a literal "<|endoftext|>" in a document stays text, as
                # with the sentencepiece models here.
                self._tok = GPT2TokenizerFast(**files, split_special_tokens=True)
                data = [_read(vocab_file), _read(merge_file)]
            else:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True,
                                                          split_special_tokens=True)
                data = [_read(os.path.join(self.model_path, f)) for f in _hf_identity_files(self.model_path)]
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DataError(f"{self.model_path}: cannot load the tokenizer ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
        if self._tok.eos_token_id is None:
            raise DataError(f"{self.model_path}: the tokenizer has no eos token to end documents with")
        # long documents are tokenized whole and cut into sequences later; no length warning
        self._tok.model_max_length = int(1e30)
        self.sha256 = hashlib.sha256(b"\0".join(data)).hexdigest()
        self.unique_identifiers = {"class": type(self).__name__, "model_sha256": self.sha256}

    def __getstate__(self):
        return {"model_path": self.model_path, "files": self._files}

    def __setstate__(self, state):
        self.model_path, self._files = state["model_path"], state["files"]
        self._load()

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # with the added tokens (<|endoftext|> may be one)

    eod = property(lambda self: self._tok.eos_token_id)
    eos = property(lambda self: self._tok.eos_token_id)
    bos = property(lambda self: self._tok.bos_token_id)
    has_bert_tokens = property(lambda self: False)

    @property
    def hf_tokenizer(self):
        """The underlying transformers tokenizer (the HF export saves a copy of it)."""
        return self._tok

    @property
    def pad(self) -> int:
        # megatron's datasets fall back to a pad id outside the vocabulary when this raises
        if self._tok.pad_token_id is None:
            raise AttributeError("no pad token")
        return self._tok.pad_token_id

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _hf_identity_files(directory: str) -> List[str]:
    # The files that define the ids, so a directory and its vocab.json/merges.txt given by hand
    # (GPT2BPETokenizer) hash alike; a directory with only tokenizer.json hashes that.
    names = set(os.listdir(directory))
    if {"vocab.json", "merges.txt"} <= names:
        return ["vocab.json", "merges.txt"]
    found = [n for n in ("tokenizer.json", "tokenizer.model", "vocab.txt") if n in names]
    if not found:
        raise DataError(f"{directory}: no tokenizer files (tokenizer.json, vocab.json + merges.txt, ...)")
    return found


TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer")


def load_tokenizer(path: Optional[str] = None, tokenizer_type: Optional[str] = None,
                   vocab_file: Optional[str] = None, merge_file: Optional[str] = None):
    """The tokenizer at ``path``: a sentencepiece ``.model`` file; a directory with ``vocab.json``
    and ``merges.txt`` (GPT-2 BPE) or a saved Hugging Face tokenizer; or a ``vocab.json`` with
    ``merges.txt`` beside it. ``tokenizer_type`` (Megatron-LM's names) makes the choice explicit;
    GPT2BPETokenizer takes ``vocab_file`` and ``merge_file`` instead of ``path``."""
    if tokenizer_type is not None and tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"tokenizer type {tokenizer_type!r} is not supported; use one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "GPT2BPETokenizer" or (tokenizer_type is None and vocab_file is not None):
        if path is not None and vocab_file is None and os.path.isdir(path):
            vocab_file, merge_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        for flag, f in (("vocab file", vocab_file), ("merge file", merge_file)):
            if f is None:
                raise DataError(f"GPT2BPETokenizer needs a {flag} (--vocab-file and --merge-file; nothing is downloaded)")
            if not os.path.isfile(f):
                raise DataError(f"{f}: no such {flag}")
        return HFTokenizer(os.path.dirname(os.path.abspath(vocab_file)), vocab_file, merge_file)
    if path is None:
        raise DataError("no tokenizer given")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such tokenizer model (a sentencepiece .model, or a tokenizer directory)")
    if tokenizer_type == "HuggingFaceTokenizer":
        if not os.path.isdir(path):
            raise DataError(f"{path}: HuggingFaceTokenizer needs a local tokenizer directory (nothing is downloaded)")
        return HFTokenizer(path)
    if tokenizer_type is None and os.path.isdir(path):
        if {"vocab.json", "merges.txt"} <= set(os.listdir(path)):
            return load_tokenizer(vocab_file=os.path.join(path, "vocab.json"), merge_file=os.path.join(path, "merges.txt"))
        return HFTokenizer(path)
    if tokenizer_type is None and os.path.basename(path) == "vocab.json":
        return load_tokenizer(vocab_file=path, merge_file=os.path.join(os.path.dirname(path), "merges.txt"))
    return SentencePieceTokenizer(path)
