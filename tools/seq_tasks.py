"""The two small sequence tasks of tools/study_seq_models.py, built from the bundled corpus (no
network): a word-level LSTM language model and an LSTM encoder-decoder that reverses word order.

Words: the lower-cased text cut into runs of letters and single punctuation marks. Training text
is the corpus's training part (``bundled.training_documents``: shuffled pieces, so any prefix
samples Austen, Shakespeare and Milton alike); validation text is the held-out part
(Persuasion, The Tempest, Paradise Regained: never seen in training), an equal share of each.

Transduction task ("reverse"): the source is a window of 4-10 consecutive corpus words, the
target is the same words in reverse order (a deterministic transduction; every target word is
in the source, so the task is learnable from the data alone).
"""
from __future__ import annotations

import collections
import functools
import random
import re
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.data import bundled

WORD = re.compile(r"[a-z]+|[.,;:!?]")
UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<bos>", "<eos>"


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


@functools.lru_cache(maxsize=4)
def training_words(n: int) -> tuple[str, ...]:
    out: list[str] = []
    for doc in bundled.training_documents():
        out.extend(words(doc["text"]))
        if len(out) >= n:
            break
    return tuple(out[:n])


@functools.lru_cache(maxsize=4)
def heldout_words(n: int) -> tuple[str, ...]:
    """``n`` words of held-out text: the first n/3 words of each of the three held-out works."""
    by_work: dict[str, list[str]] = collections.defaultdict(list)
    for doc in bundled.corpus_documents("heldout"):
        work = next(h for h in bundled.HELDOUT if doc["title"].startswith(h))
        by_work[work].extend(words(doc["text"]))
    share = n // len(bundled.HELDOUT)
    return tuple(w for work in bundled.HELDOUT for w in by_work[work][:share])


class Vocab:
    """The ``size - len(specials)`` most frequent training words plus the special tokens."""

    def __init__(self, tokens, size: int, specials=(UNK,)):
        common = [w for w, _ in collections.Counter(tokens).most_common(size - len(specials))]
        self.itos = list(specials) + common
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.unk = self.stoi[UNK]

    def __len__(self) -> int:
        return len(self.itos)

    def ids(self, tokens) -> list[int]:
        return [self.stoi.get(w, self.unk) for w in tokens]


@dataclass(frozen=True)
class Size:
    """Model and data sizes. ``val``: validation words (LM) or pairs (seq2seq); ``bptt``: the
    LM's window; ``min_len``/``max_len``: the seq2seq source lengths."""

    vocab: int
    embed: int
    hidden: int
    batch: int
    train_words: int
    val: int
    bptt: int = 32
    min_len: int = 4
    max_len: int = 10


# -- language model ----------------------------------------------------------------------------
class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        h, state = self.lstm(self.drop(self.embed(x)), state)
        return self.out(self.drop(h)), state


def batchify(ids: list[int], batch: int) -> torch.Tensor:
    """The id stream as ``batch`` parallel rows (the classic truncated-BPTT layout)."""
    n = len(ids) // batch
    return torch.tensor(ids[: n * batch]).view(batch, n)


class LMTask:
    """Truncated BPTT over the training stream; the LSTM state is carried between windows."""

    name = "lstm_lm"

    default_size = Size(vocab=2000, embed=48, hidden=96, batch=16, train_words=200_000, val=15_000)

    def __init__(self, size: Size = default_size):
        train = training_words(size.train_words)
        self.vocab = Vocab(train, size.vocab)
        self.size = size
        self.train = batchify(self.vocab.ids(train), size.batch)
        self.val = batchify(self.vocab.ids(heldout_words(size.val)), size.batch)
        self.state = None
        self.pos = 0

    def model(self) -> nn.Module:
        return LSTMLanguageModel(len(self.vocab), self.size.embed, self.size.hidden)

    def _window(self, data: torch.Tensor, pos: int):
        t = min(self.size.bptt, data.shape[1] - 1 - pos)
        return data[:, pos:pos + t], data[:, pos + 1:pos + 1 + t]

    def train_loss(self, model: nn.Module, rng: random.Random) -> torch.Tensor:
        if self.pos + 2 > self.train.shape[1]:
            self.pos, self.state = 0, None
        x, y = self._window(self.train, self.pos)
        self.pos += x.shape[1]
        if self.state is not None:
            self.state = tuple(s.detach() for s in self.state)
        logits, self.state = model(x, self.state)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        model.eval()
        total, count, state, pos = 0.0, 0, None, 0
        while pos + 1 < self.val.shape[1]:
            x, y = self._window(self.val, pos)
            logits, state = model(x, state)
            total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 reduction="sum").item()
            count += y.numel()
            pos += x.shape[1]
        model.train()
        loss = total / count
        return dict(val_loss=loss, val_ppl=float(torch.exp(torch.tensor(loss))))


# -- sequence to sequence: reverse the words ----------------------------------------------------
def windows(tokens, n: int | None, min_len: int, max_len: int, seed: int) -> list[list[str]]:
    """Consecutive, non-overlapping word windows of random length in [min_len, max_len]."""
    rng, out, i = random.Random(seed), [], 0
    while i + max_len <= len(tokens) and (n is None or len(out) < n):
        k = rng.randint(min_len, max_len)
        out.append(list(tokens[i:i + k]))
        i += k
    return out


class Seq2Seq(nn.Module):
    """LSTM encoder-decoder (no attention): the decoder starts from the encoder's final state."""

    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.src_embed = nn.Embedding(vocab, embed)
        self.tgt_embed = nn.Embedding(vocab, embed)
        self.encoder = nn.LSTM(embed, hidden, batch_first=True)
        self.decoder = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, src, tgt_in):
        _, state = self.encoder(self.src_embed(src))
        h, _ = self.decoder(self.tgt_embed(tgt_in), state)
        return self.out(h)


def pad_batch(seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs])


class ReverseTask:
    """Source: 4-10 corpus words; target: the same words reversed, then <eos>. Teacher-forced
    cross-entropy over target tokens (padding ignored); token accuracy alongside."""

    name = "seq2seq_reverse"

    default_size = Size(vocab=1500, embed=48, hidden=96, batch=32, train_words=200_000, val=600)

    def __init__(self, size: Size = default_size):
        train = training_words(size.train_words)
        self.size = size
        self.vocab = Vocab(train, size.vocab, specials=(UNK, PAD, BOS, EOS))
        self.pad, self.bos, self.eos = (self.vocab.stoi[t] for t in (PAD, BOS, EOS))
        self.train = [self.vocab.ids(w) for w in windows(train, None, size.min_len, size.max_len, seed=0)]
        held = heldout_words(size.val * size.max_len * 2)
        self.val = [self.vocab.ids(w) for w in windows(held, size.val, size.min_len, size.max_len, seed=1)]

    def model(self) -> nn.Module:
        return Seq2Seq(len(self.vocab), self.size.embed, self.size.hidden)

    def tensors(self, srcs: list[list[int]]):
        tgts = [s[::-1] + [self.eos] for s in srcs]
        return (pad_batch(srcs, self.pad), pad_batch([[self.bos] + t[:-1] for t in tgts], self.pad),
                pad_batch(tgts, self.pad))

    def _loss(self, model, batch, reduction="mean"):
        src, tgt_in, tgt = self.tensors(batch)
        logits = model(src, tgt_in)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                           ignore_index=self.pad, reduction=reduction)
        return loss, logits, tgt

    def train_loss(self, model: nn.Module, rng: random.Random) -> torch.Tensor:
        return self._loss(model, rng.sample(self.train, self.size.batch))[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        model.eval()
        total, correct, count = 0.0, 0, 0
        for i in range(0, len(self.val), 256):
            loss, logits, tgt = self._loss(model, self.val[i:i + 256], reduction="sum")
            mask = tgt != self.pad
            total += loss.item()
            correct += ((logits.argmax(-1) == tgt) & mask).sum().item()
            count += mask.sum().item()
        model.train()
        return dict(val_loss=total / count, val_token_acc=correct / count)


TASKS = {LMTask.name: LMTask, ReverseTask.name: ReverseTask}
