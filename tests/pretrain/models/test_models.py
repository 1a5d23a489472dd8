"""GPT and BERT on megatron-core: configs, shapes, exact GPT-2 / MegatronBert layout, TP=2 == TP=1,
and GPT learning on the bundled corpus."""

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import (
    BertConfig,
    GPTConfig,
    bert_logits,
    bert_loss,
    build_bert,
    build_gpt,
    config_from_dict,
    get_preset,
    gpt_logits,
    gpt_loss,
)
from pretrain.models.hf_compat import bert_to_hf, gpt_to_hf

VOCAB = 1000  # not a multiple of 128: exercises vocabulary padding


def _gpt_cfg(**kw):
    return get_preset("tiny", "gpt", vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0, **kw)


def _bert_cfg(**kw):
    return get_preset("tiny", "bert", vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0, **kw)


def _gpt_param_count(c: GPTConfig) -> int:
    h, f, L = c.hidden_size, c.ffn_hidden_size, c.num_layers
    per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    return c.padded_vocab_size * h + c.seq_length * h + L * per_layer + 2 * h


def _scramble(model, seed=0):
    """Replace the tiny init with large random weights so that small layout differences
    (GeLU flavour, LayerNorm eps, head order) change the logits measurably."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "layernorm" in name or "layer_norm" in name else 0.5 * noise)


# --- configs -------------------------------------------------------------------------------------

def test_presets_have_the_standard_shapes():
    gpt2 = get_preset("gpt2-124m")
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.num_attention_heads, gpt2.seq_length,
            gpt2.vocab_size, gpt2.ffn_hidden_size) == (12, 768, 12, 1024, 50257, 3072)
    assert gpt2.padded_vocab_size == 50304
    # HF's GPT-2 small has 124,439,808 parameters; ours adds the 47 padding rows.
    assert _gpt_param_count(gpt2) == 124_439_808 + 47 * 768
    assert 340e6 < _gpt_param_count(get_preset("gpt2-345m")) < 360e6
    assert 1.25e9 < _gpt_param_count(get_preset("gpt2-1.3b")) < 1.35e9
    base, large = get_preset("bert-base"), get_preset("bert-large")
    assert (base.num_layers, base.hidden_size, base.seq_length, base.vocab_size) == (12, 768, 512, 30522)
    assert (large.num_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)
    assert isinstance(base, BertConfig) and base.num_tokentypes == 2
    assert get_preset("tiny", "bert", add_binary_head=False).num_tokentypes == 0


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="ambiguous"):
        get_preset("tiny")
    with pytest.raises(ValueError, match="unknown gpt preset"):
        get_preset("gpt2-7b", "gpt")
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(num_layers=1, hidden_size=10, num_attention_heads=3, seq_length=8, vocab_size=10)
    with pytest.raises(ValueError, match="attention_backend"):
        _gpt_cfg(attention_backend="flash")
    with pytest.raises(ValueError, match="unknown gpt model config keys"):
        config_from_dict({"preset": "tiny", "n_layers": 3}, "gpt")
    cfg = config_from_dict({"preset": "demo", "hidden_dropout": 0.0, "vocab_size": 500}, "gpt")
    assert cfg.num_layers == 6 and cfg.hidden_dropout == 0.0 and cfg.padded_vocab_size == 512


def test_build_needs_model_parallel_state():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        pytest.skip("parallel state set up by an earlier test in this process")
    with pytest.raises(RuntimeError, match="init_model_parallel"):
        build_gpt(_gpt_cfg())


@pytest.mark.usefixtures("model_parallel_tp1")
def test_cpu_refuses_gpu_only_attention():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(ValueError, match="needs CUDA"):
        build_gpt(_gpt_cfg(attention_backend="local"))
    with pytest.raises(ValueError, match="needs CUDA"):
        build_bert(_bert_cfg(attention_backend="te"))


# --- GPT -----------------------------------------------------------------------------------------

@pytest.mark.usefixtures("model_parallel_tp1")
def test_builders_return_the_init_temporaries_to_the_kernel(monkeypatch):
    """build_gpt / build_bert trim the C heap once after megatron's CPU init (memopt.heap),
    unless release_init_memory=False; the weights do not depend on it."""
    import pretrain.models.bert as bert_module
    import pretrain.models.gpt as gpt_module

    calls = []
    for module in (gpt_module, bert_module):
        monkeypatch.setattr(module, "release_free_memory", lambda: calls.append(1) or True)
    a = build_gpt(_gpt_cfg(), seed=3)
    build_bert(_bert_cfg())
    assert len(calls) == 2
    b = build_gpt(_gpt_cfg(), seed=3, release_init_memory=False)
    build_bert(_bert_cfg(), release_init_memory=False)
    assert len(calls) == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if torch.is_tensor(x))


@pytest.mark.usefixtures("model_parallel_tp1")
def test_gpt_shapes_parameters_and_gradients():
    cfg = _gpt_cfg()
    model = build_gpt(cfg)
    assert sum(p.numel() for p in model.parameters()) == _gpt_param_count(cfg)
    # GPT-2 layout: tied output layer (no weight of its own), final LayerNorm, GPT-2 eps.
    names = dict(model.named_parameters())
    assert "output_layer.weight" not in names and "decoder.final_layernorm.weight" in names
    assert model.decoder.final_layernorm.eps == 1e-5
    tokens = torch.randint(0, VOCAB, (3, 16))
    logits = gpt_logits(model, tokens)
    assert logits.shape == (3, 16, VOCAB)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(3, 16)}
    loss, n = gpt_loss(model, batch)
    assert loss.dim() == 0 and n.item() == 48
    # Untrained: the loss is close to log(padded vocab).
    assert abs(loss.item() - torch.log(torch.tensor(float(cfg.padded_vocab_size))).item()) < 0.5
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.usefixtures("model_parallel_tp1")
def test_gpt_loss_mask_and_causality():
    model = build_gpt(_gpt_cfg()).eval()
    tokens = torch.randint(0, VOCAB, (2, 12))
    labels = torch.roll(tokens, -1, 1)
    mask = torch.zeros(2, 12)
    mask[:, :5] = 1
    with torch.no_grad():
        loss, n = gpt_loss(model, {"tokens": tokens, "labels": labels, "loss_mask": mask})
        # The vocabulary's padding rows take part in megatron's softmax, so the reference is
        # computed on the full (padded) logits.
        full = model(tokens, torch.arange(12).expand(2, -1), None, runtime_gather_output=True)
        ref = F.cross_entropy(full[:, :5].reshape(-1, full.shape[-1]), labels[:, :5].reshape(-1))
        assert n.item() == 10 and torch.allclose(loss, ref, atol=1e-5)
        # An explicit causal mask (megatron convention: True = masked), as datasets with
        # reset_attention_mask provide, gives the same result as the built-in causal path.
        causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), 1).expand(2, 1, 12, 12)
        masked, _ = gpt_loss(model, {"tokens": tokens, "labels": labels, "loss_mask": mask,
                                     "attention_mask": causal})
        assert torch.allclose(masked, loss, atol=1e-6)
        # Changing a later token never changes earlier logits.
        changed = tokens.clone()
        changed[:, 8] = (changed[:, 8] + 1) % VOCAB
        a, b = gpt_logits(model, tokens), gpt_logits(model, changed)
        assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6) and not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.usefixtures("model_parallel_tp1")
def test_gpt_is_exactly_gpt2():
    """Pure weight mapping into transformers' GPT2LMHeadModel gives the same logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = _gpt_cfg()
    model = build_gpt(cfg).eval()
    _scramble(model)
    hf_state, hf_config = gpt_to_hf(model.state_dict(), cfg)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config)).eval()
    hf.load_state_dict(hf_state, strict=True)
    tokens = torch.randint(0, VOCAB, (2, cfg.seq_length))
    with torch.no_grad():
        ours, ref = gpt_logits(model, tokens), hf(tokens).logits
    scale = ref.abs().max().item()
    assert scale > 1.0
    assert (ours - ref).abs().max().item() < 5e-6 * scale  # tanh vs erf GeLU would give ~5e-5


@pytest.mark.usefixtures("model_parallel_tp1")
def test_same_seed_same_weights_and_dropout_is_active_in_training():
    a, b = build_gpt(_gpt_cfg(), seed=7), build_gpt(_gpt_cfg(), seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_gpt(_gpt_cfg(), seed=8)
    assert not torch.equal(a.embedding.word_embeddings.weight, c.embedding.word_embeddings.weight)
    model = build_gpt(get_preset("tiny", "gpt", vocab_size=VOCAB))  # dropout 0.1
    tokens = torch.randint(0, VOCAB, (2, 16))
    model.train()
    assert not torch.allclose(gpt_logits(model, tokens), gpt_logits(model, tokens))
    model.eval()
    assert torch.equal(gpt_logits(model, tokens), gpt_logits(model, tokens))


# --- BERT ----------------------------------------------------------------------------------------

def _bert_batch(b=3, s=20):
    tokens = torch.randint(7, VOCAB, (b, s))
    padding = torch.ones(b, s, dtype=torch.long)
    padding[1, 12:] = 0
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, 8:] = 1
    labels = torch.full((b, s), -1)
    loss_mask = torch.zeros(b, s, dtype=torch.long)
    loss_mask[:, [2, 5, 9]] = 1
    labels[:, [2, 5, 9]] = tokens[:, [2, 5, 9]]
    return {"text": tokens, "types": types, "padding_mask": padding, "labels": labels,
            "loss_mask": loss_mask, "is_random": torch.tensor([0, 1, 0])}


@pytest.mark.usefixtures("model_parallel_tp1")
def test_bert_shapes_and_losses():
    batch = _bert_batch()
    model = build_bert(_bert_cfg())
    logits, binary = bert_logits(model, batch["text"], batch["padding_mask"], batch["types"])
    assert logits.shape == (3, 20, VOCAB) and binary.shape == (3, 2)
    loss, parts = bert_loss(model, batch)
    assert set(parts) == {"mlm", "sop"}
    assert torch.allclose(loss.detach(), parts["mlm"] + parts["sop"])
    loss.backward()
    assert model.binary_head.weight.grad is not None
    assert model.embedding.tokentype_embeddings.weight.grad is not None

    plain = build_bert(_bert_cfg(add_binary_head=False))
    assert plain.embedding.tokentype_embeddings is None and plain.binary_head is None
    loss, parts = bert_loss(plain, batch)
    assert set(parts) == {"mlm"}
    # Padding keys are ignored: changing tokens under the padding leaves real positions alone.
    plain.eval()
    changed = batch["text"].clone()
    changed[1, 12:] = 7
    with torch.no_grad():
        a, _ = bert_logits(plain, batch["text"], batch["padding_mask"])
        b, _ = bert_logits(plain, changed, batch["padding_mask"])
    assert torch.allclose(a[1, :12], b[1, :12], atol=1e-5)
    assert torch.isfinite(a).all()


@pytest.mark.usefixtures("model_parallel_tp1")
def test_bert_is_exactly_megatron_bert():
    """Pure weight mapping into transformers' MegatronBertForPreTraining gives the same logits
    (pre-LN blocks, final LayerNorm, erf GeLU, MLM head, pooler and binary head)."""
    from transformers import MegatronBertConfig, MegatronBertForPreTraining

    cfg = _bert_cfg()
    model = build_bert(cfg).eval()
    _scramble(model, seed=1)
    hf_state, hf_config = bert_to_hf(model.state_dict(), cfg)
    hf = MegatronBertForPreTraining(MegatronBertConfig(**hf_config)).eval()
    hf.load_state_dict(hf_state, strict=True)
    batch = _bert_batch()
    with torch.no_grad():
        ours, binary = bert_logits(model, batch["text"], batch["padding_mask"], batch["types"])
        out = hf(batch["text"], attention_mask=batch["padding_mask"], token_type_ids=batch["types"])
    real = batch["padding_mask"].bool()
    scale = out.prediction_logits.abs().max().item()
    assert (ours - out.prediction_logits)[real].abs().max().item() < 1e-5 * scale
    assert (binary - out.seq_relationship_logits).abs().max().item() < 1e-4


# --- tensor parallelism --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_inputs():
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=g)
    gpt_batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 24)}
    return gpt_batch, _bert_batch()


def _run_models():
    """Logits, loss and full gradients of the tiny GPT and BERT on fixed inputs (this rank's view;
    sharded gradients are gathered over the TP group)."""
    from megatron.core import parallel_state

    torch.manual_seed(0)
    gpt_batch, bert_batch = _tp_inputs()
    out = {}
    for kind, build, cfg, run in (
        ("gpt", build_gpt, _gpt_cfg(), lambda m: (gpt_logits(m, gpt_batch["tokens"]), gpt_loss(m, gpt_batch)[0])),
        ("bert", build_bert, _bert_cfg(),
         lambda m: (bert_logits(m, bert_batch["text"], bert_batch["padding_mask"], bert_batch["types"])[0],
                    bert_loss(m, bert_batch)[0])),
    ):
        model = build(cfg, seed=42)
        logits, loss = run(model)
        loss.backward()
        grads = {}
        group = parallel_state.get_tensor_model_parallel_group()
        world = parallel_state.get_tensor_model_parallel_world_size()
        for name, p in model.named_parameters():
            g = p.grad.detach()
            if getattr(p, "tensor_model_parallel", False) and world > 1:
                parts = [torch.empty_like(g) for _ in range(world)]
                torch.distributed.all_gather(parts, g.contiguous(), group=group)
                g = torch.cat(parts, dim=p.partition_dim)
            grads[name] = g
        out[kind] = {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}
    return out


def _tp_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pretrain.models import destroy_model_parallel, init_model_parallel

    init_model_parallel(tensor_parallel_size=world)
    out = _run_models()
    if rank == 0:
        torch.save(out, path)
    destroy_model_parallel(destroy_process_group=True)


@pytest.mark.usefixtures("model_parallel_tp1")
def test_tensor_parallel_2_matches_1(tmp_path):
    """TP=2 on CPU (2 processes, gloo): same logits, loss and (gathered) gradients as TP=1."""
    import torch.multiprocessing as mp

    path = str(tmp_path / "tp2.pt")
    mp.spawn(_tp_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    tp2 = torch.load(path)
    tp1 = _run_models()
    for kind in ("gpt", "bert"):
        assert torch.allclose(tp1[kind]["logits"], tp2[kind]["logits"], atol=1e-5), kind
        assert torch.allclose(tp1[kind]["loss"], tp2[kind]["loss"], atol=1e-6), kind
        assert tp1[kind]["grads"].keys() == tp2[kind]["grads"].keys()
        for name, g in tp1[kind]["grads"].items():
            assert g.shape == tp2[kind]["grads"][name].shape, name
            assert torch.allclose(g, tp2[kind]["grads"][name], atol=1e-5, rtol=1e-4), name


# --- learning on the bundled corpus --------------------------------------------------------------

@pytest.mark.usefixtures("model_parallel_tp1")
def test_gpt_loss_decreases_on_bundled_corpus(bundled_small, tmp_path):
    from pretrain.data import build_gpt_datasets, build_loader, load_tokenizer

    tok = load_tokenizer(bundled_small["tokenizer"])
    train, _, _ = build_gpt_datasets(bundled_small["gpt"], tok, seq_length=64,
                                     num_samples=(8 * 40, 0, 0), split="1,0,0",
                                     cache_dir=str(tmp_path))
    cfg = get_preset("tiny", "gpt", vocab_size=tok.vocab_size, hidden_dropout=0.0,
                     attention_dropout=0.0)
    model = build_gpt(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    # megatron sizes a dataset in whole epochs (at least num_samples): stop after 40 steps.
    for _, batch in zip(range(40), build_loader(train, micro_batch_size=8)):
        loss, _ = gpt_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 40
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert start > 8.5  # ~log(8192) at initialization
    assert end < start - 1.5, losses
