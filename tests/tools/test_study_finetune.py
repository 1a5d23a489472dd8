"""tools/study_finetune.py: the held-out split, and one fine-tuning step of every method on a
tiny GPT-2 (LoRA trains only its adapters; AdaLomo and LOMO update inside the backward)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
spec = importlib.util.spec_from_file_location("study_finetune", ROOT / "tools" / "study_finetune.py")
ft = importlib.util.module_from_spec(spec)
sys.modules["study_finetune"] = ft
spec.loader.exec_module(ft)


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [1 + ord(c) % 60 for c in text[:400]]}


def test_heldout_split_is_by_piece_and_disjoint():
    train, val = ft.heldout_pieces()
    assert not {d["title"] for d in train} & {d["title"] for d in val}
    assert len(train) > 4 * len(val) > 0
    assert all(d["title"].startswith(("austen/persuasion", "shakespeare_milton/tempest",
                                      "shakespeare_milton/paradise_regained")) for d in train + val)
    tb, vb = ft.heldout_blocks(CharTokenizer(), seq_len=16)
    assert tb.shape[1] == vb.shape[1] == 16 and len(tb) > len(vb) > 0


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method", list(ft.METHODS))
def test_one_step_of_each_method(tiny_gpt2, method):
    pytest.importorskip("peft") if method == "lora" else None
    model, opt, fused, params = ft.build(method, tiny_gpt2, lr=1e-2)
    assert fused == (method in ("adalomo", "lomo"))
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    ids = torch.randint(0, 64, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    ft.seq.update(opt, loss, params, fused)
    changed = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    if method == "lora":
        assert changed and all("lora_" in n for n in changed)
        assert sum(p.numel() for p in params) < 0.5 * sum(p.numel() for p in named.values())
    else:
        assert len(changed) == len(named)  # full fine-tuning: every weight moves
