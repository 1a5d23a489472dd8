"""tools/train_tokenizer.py and the SentencePieceTokenizer wrapper."""

import json
import os
import pickle
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))

import train_tokenizer  # noqa: E402

from pretrain.data import bundled  # noqa: E402
from pretrain.data.readers import DataError  # noqa: E402
from pretrain.data.tokenizer import SentencePieceTokenizer  # noqa: E402

TEXTS = [
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,\n"
    "must be in want of a wife.",
    "Of Mans First Disobedience, and the Fruit\nOf that Forbidden Tree, whose mortal tast",
    "To be, or not to be, that is the question: in 1603 and 1604 the quartos differ.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_corpus")
    jsonl = d / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t * 20, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    txt = d / "more.txt"
    txt.write_text("\n\n".join(TEXTS[::-1] * 10))
    return d, str(jsonl), str(txt)


def _train(tmp_path, inputs, *extra, name="tok", vocab=400):
    prefix = str(tmp_path / name)
    train_tokenizer.main(["--input", *inputs, "--output-prefix", prefix, "--vocab-size", str(vocab),
                          "--threads", "1", *extra])
    return SentencePieceTokenizer(prefix + ".model")


def test_bpe_with_bert_tokens_layout_and_round_trip(tmp_path, corpus, capsys):
    _, jsonl, txt = corpus
    tok = _train(tmp_path, [jsonl, txt], "--bert-special-tokens")
    assert "wrote" in capsys.readouterr().out
    assert tok.vocab_size == 400 and os.path.exists(str(tmp_path / "tok.vocab"))
    assert [tok.id_to_piece(i) for i in range(7)] == ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]
    assert (tok.pad, tok.unk, tok.bos, tok.eos, tok.eod, tok.cls, tok.sep, tok.mask) == (0, 1, 2, 3, 3, 4, 5, 6)
    # Byte fallback: characters never seen in training still round-trip, and nothing is <unk>.
    text = "  Übermäßig — naïve café 🙂\n\tdone [SEP] 42  "
    ids = tok.tokenize(text)
    assert tok.unk not in ids
    assert tok.detokenize(ids) == text
    # BERT specials are control symbols: the literal text "[SEP]" is not the [SEP] token.
    assert tok.sep not in ids and tok.cls not in tok.tokenize("[CLS] x")
    # Digits are split, so numbers never become single opaque pieces.
    assert [tok.id_to_piece(i) for i in tok.tokenize("1603")][-4:] == ["1", "6", "0", "3"]


def test_gpt_tokenizer_has_no_bert_tokens_and_unigram_works(tmp_path, corpus):
    _, jsonl, _ = corpus
    tok = _train(tmp_path, [jsonl], "--model-type", "unigram", name="uni", vocab=330)
    assert not tok.has_bert_tokens
    with pytest.raises(DataError, match="no \\[CLS\\] token"):
        tok.cls
    assert tok.id_to_piece(4) == "<0x00>"  # bytes follow the four specials directly
    assert tok.detokenize(tok.tokenize(TEXTS[1])) == TEXTS[1]


def test_training_is_deterministic(tmp_path, corpus):
    _, jsonl, txt = corpus
    a = _train(tmp_path, [jsonl, txt], name="a")
    b = _train(tmp_path, [jsonl, txt], name="b")
    assert a.sha256 == b.sha256


def test_tokenizer_pickles_and_exposes_wordpiece_view(tmp_path, corpus):
    _, jsonl, _ = corpus
    tok = _train(tmp_path, [jsonl], "--bert-special-tokens")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(TEXTS[0]) == tok.tokenize(TEXTS[0]) and clone.sha256 == tok.sha256
    inv = tok.inv_vocab
    pieces = [tok.id_to_piece(i) for i in tok.tokenize("handsome disposition")]
    views = [inv[i] for i in tok.tokenize("handsome disposition")]
    for piece, view in zip(pieces, views):
        # Word-initial pieces (with "▁") stay; continuation pieces read as WordPiece "##...".
        assert view == piece if piece.startswith("\u2581") else view == "##" + piece
    assert inv[tok.mask] == "[MASK]" and inv[tok.unk] == "<unk>"


@pytest.mark.parametrize(
    "make_input, extra, message",
    [
        (lambda d: str(d / "missing.jsonl"), [], "missing.jsonl: no such file"),
        (lambda d: _write(d / "k.jsonl", '{"body": "x"}\n'), [], "no 'text' key (keys: body)"),
        (lambda d: _write(d / "e.jsonl", '{"text": "a b"}\n{"text": "  "}\n'), [], "e.jsonl:2: empty document"),
        (lambda d: _write(d / "bad.jsonl", '{"text": \n'), [], "bad.jsonl:1: invalid JSON"),
        (lambda d: _write(d / "x.csv", "a,b\n"), [], "unsupported input type"),
        (lambda d: _write(d / "ok.txt", "some text " * 50), ["--vocab-size", "50"], "too small"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, make_input, extra, message):
    path = make_input(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(["--input", path, "--output-prefix", str(tmp_path / "t"),
                              "--vocab-size", "400", *extra])
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text and message in text, text
    assert not os.path.exists(tmp_path / "t.model")


def test_loading_a_foreign_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "tok.model"
    bogus.write_bytes(b"definitely not a protobuf")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        SentencePieceTokenizer(str(bogus))
    with pytest.raises(DataError, match="no such tokenizer model"):
        SentencePieceTokenizer(str(tmp_path / "nope.model"))


def test_bundled_tokenizer():
    tok = SentencePieceTokenizer(bundled.TOKENIZER)
    assert tok.vocab_size == 8192 and tok.has_bert_tokens
    heldout = next(bundled.corpus_documents("heldout"))["text"]
    ids = tok.tokenize(heldout)
    assert tok.detokenize(ids) == heldout
    assert tok.unk not in ids
    assert len(heldout) / len(ids) > 3.0  # a real BPE vocabulary, not characters


def _write(path, text):
    path.write_text(text)
    return str(path)
