"""Local zero-shot tasks built from the held-out part of the bundled corpus (never trained on).

    python -m pretrain.eval.build_tasks            # rewrites pretrain/eval/tasks/*.jsonl

Three tasks, deterministic (seeded), in lm-eval's YAML format (``pretrain/eval/tasks/*.yaml``):

- ``heldout_cloze``: LAMBADA-style last-word prediction: a passage of about 30 words whose last
  (alphabetic, 3+ letters) word is the target. Metrics: acc (greedy = target), perplexity.
- ``heldout_nextpassage``: multiple choice: a passage and four candidate continuations (the true
  next 15 words and three from elsewhere in the held-out text). Metrics: acc, acc_norm.
- ``heldout_ppl``: rolling log-likelihood of held-out paragraphs. Metrics: word/byte perplexity,
  bits per byte.

Passages are short on purpose (the tiny test models have 64 positions); whitespace is collapsed.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "tasks"
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _paragraphs(docs):
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc["text"]):
            words = para.split()
            if len(words) >= 20:
                yield doc["title"], words


def build(out_dir: Path = TASK_DIR, n_cloze: int = 300, n_mc: int = 200, n_ppl: int = 100, seed: int = 0) -> dict:
    from pretrain.data import bundled

    rng = random.Random(seed)
    paras = list(_paragraphs(bundled.corpus_documents("heldout")))
    rng.shuffle(paras)

    cloze = []
    for title, words in paras:
        ends = [i for i in range(30, len(words)) if _WORD.match(words[i])]
        if not ends:
            continue
        end = rng.choice(ends)
        cloze.append({"context": " ".join(words[end - 30:end]), "target": words[end], "source": title})
        if len(cloze) >= n_cloze:
            break

    chunks = [(t, w[i:i + 40]) for t, w in paras for i in range(0, len(w) - 39, 40)]
    pool = [" ".join(w[25:40]) for _, w in chunks]
    mc = []
    for k, (title, w) in enumerate(chunks[:n_mc]):
        gold = " ".join(w[25:40])
        others = rng.sample([p for j, p in enumerate(pool) if j != k and p != gold], 3)
        label = rng.randrange(4)
        choices = others[:label] + [gold] + others[label:]
        mc.append({"context": " ".join(w[:25]), "choices": choices, "label": label, "source": title})

    ppl = [{"text": " ".join(w[:120]), "source": t} for t, w in paras[:n_ppl]]

    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, rows in (("heldout_cloze", cloze), ("heldout_nextpassage", mc), ("heldout_ppl", ppl)):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        sizes[name] = len(rows)
    return sizes


if __name__ == "__main__":
    print(build())
