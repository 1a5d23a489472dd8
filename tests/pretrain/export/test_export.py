"""HF export and import: every engine's checkpoint round-trips, the logit check catches a wrong
weight, the tokenizer keeps its ids, corrupt inputs are refused with a clear error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
CACHE = str(ROOT / "data/cache")
PY = sys.executable
sys.path.insert(0, str(ROOT / "tools"))

# SGD: the sharded runs can be compared with the single-process run weight by weight (an
# adaptive optimizer would amplify reduction-order noise in near-zero gradients).
COMMON = [f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}", "train.progress_bar=false", "train.eval_every=0",
          "checkpoint.every=0", "optimizer.name=sgd", "optimizer.lr=0.5", "train.steps=2"]


def _train_single(out: Path, *overrides):
    from pretrain.config import load_run_config
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    train(load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [f"output_dir={out}", *COMMON, *overrides]), GPT)
    return out / "checkpoints" / "step_00000002"


def _launch(out: Path, launcher: list, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           *launcher, str(ROOT / "launch/pretrain_gpt.py"), "--config", str(ROOT / "configs/gpt_tiny.yaml"),
           f"output_dir={out}", *COMMON, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoints" / "step_00000002"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A 2-step single-process run: its checkpoint and its weights."""
    ckpt = _train_single(tmp_path_factory.mktemp("single"), "train.micro_batch_size=8")
    return ckpt, torch.load(ckpt / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def exported(single, tmp_path_factory):
    from pretrain.export import export

    out = tmp_path_factory.mktemp("hf") / "gpt"
    report = export(str(single[0]), str(out))
    return out, report


def _close_to_single(sd, single_sd, tol=1e-5):
    keys = [k for k in single_sd if not k.endswith("_extra_state")]
    assert sorted(keys) == sorted(sd)
    worst = max(float((sd[k] - single_sd[k].float()).abs().max()) for k in keys)
    assert worst < tol, worst
    return worst


def test_single_process_export_validates_and_round_trips(single, exported, tmp_path):
    from safetensors.torch import load_file

    from pretrain.export import import_gpt2

    out, report = exported
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "export_report.json"):
        assert (out / name).is_file(), name
    assert report.hf_class == "GPT2LMHeadModel" and report.source_format == "torch"
    assert report.max_abs_diff < 1e-4
    assert report.tokenizer["tokens_compared"] > 10_000  # probes + held-out text, ids identical
    assert set(load_file(out / "model.safetensors")) >= {"transformer.wte.weight", "transformer.h.1.attn.c_attn.weight"}
    # HF -> our checkpoint: the same weights come back, exactly
    res = import_gpt2(str(out), str(tmp_path / "back"))
    assert res["max_abs_diff"] < 1e-4
    back = torch.load(Path(res["checkpoint"]) / "model.pt", weights_only=True)
    for k, v in single[1].items():
        if not k.endswith("_extra_state"):
            assert torch.equal(back[k], v), k
    for name in ("optimizer.pt", "scheduler.pt", "trainer.json"):
        assert (Path(res["checkpoint"]) / name).is_file()


def test_imported_checkpoint_continues_pretraining(exported, tmp_path):
    """The reverse direction gives a checkpoint that checkpoint.resume accepts as is."""
    from pretrain.config import load_run_config
    from pretrain.export import import_gpt2
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    res = import_gpt2(str(exported[0]), str(tmp_path / "imp"), overrides=[f"data.cache_dir={CACHE}"])
    cfg = load_run_config(res["config"], ["train.steps=1", "train.progress_bar=false", "train.eval_every=0",
                                          f"checkpoint.resume={res['checkpoint']}"])
    summary = train(cfg, GPT)
    assert summary["steps"] == 1 and summary["first_loss"] < 9.5  # starts from the trained weights, not random


def test_hf_tokenizer_ids_identical(exported):
    from transformers import AutoTokenizer

    from pretrain.data.tokenizer import SentencePieceTokenizer

    hf = AutoTokenizer.from_pretrained(str(exported[0]), local_files_only=True)
    sp = SentencePieceTokenizer(TOKENIZER)
    for text in ["  Two leading spaces, émigré 123 🙂\n\nnew [SEP] </s>", "It is a truth universally acknowledged"]:
        assert hf.encode(text, add_special_tokens=False) == sp.tokenize(text)
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == text
    assert (hf.eos_token_id, hf.pad_token_id, hf.vocab_size) == (3, 0, sp.vocab_size)


def test_validation_fails_on_a_permuted_weight(single, tmp_path, monkeypatch, capsys):
    import convert_to_hf

    import pretrain.export.hf as hfmod
    from pretrain.export import ValidationError, export, validate_export
    from pretrain.export.hf import read_checkpoint

    real = hfmod.gpt_to_hf

    def buggy(sd, cfg):  # a mapping bug: two heads' rows of the fused QKV swapped
        out, conf = real(sd, cfg)
        w = out["transformer.h.0.attn.c_attn.weight"].clone()
        out["transformer.h.0.attn.c_attn.weight"] = torch.cat([w[:, 16:32], w[:, :16], w[:, 32:]], dim=1)
        return out, conf

    monkeypatch.setattr(hfmod, "gpt_to_hf", buggy)
    rc = convert_to_hf.main([str(single[0]), str(tmp_path / "bad"), "--tol", "1e-4"])
    assert rc == 3
    assert "validation failed" in capsys.readouterr().err
    monkeypatch.setattr(hfmod, "gpt_to_hf", real)

    # and a permutation applied to the written file is caught by the check of that file
    def permute_rows(hf_sd):
        hf_sd = dict(hf_sd)
        w = hf_sd["transformer.h.1.mlp.c_fc.weight"]
        hf_sd["transformer.h.1.mlp.c_fc.weight"] = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))]
        return hf_sd

    with pytest.raises(ValidationError, match="exceeds tolerance"):
        export(str(single[0]), str(tmp_path / "bad2"), transform=permute_rows, verify_tokenizer=False)
    assert validate_export(read_checkpoint(str(single[0])), str(tmp_path / "bad2"), tol=1e9) > 1e-3


def test_corrupt_checkpoints_are_refused_cleanly(single, exported, tmp_path, capsys):
    import convert_to_hf

    from pretrain.checkpoint import write_manifest
    from pretrain.export import ExportError, load_model_state
    from pretrain.export.hf import load_hf

    src = single[0]
    # truncated model.pt
    bad = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(src.parent.parent, tmp_path / "run", dirs_exist_ok=True)
    data = (bad / "model.pt").read_bytes()
    (bad / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="model.pt"):
        load_model_state(bad)
    assert convert_to_hf.main([str(bad), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    # the manifest's sizes and checksums catch it before any unpickling
    assert err.startswith("error: ") and "model.pt: " in err and "manifest.json says" in err and "Traceback" not in err

    # a pickle that would run code is not executed
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"embedding.word_embeddings.weight": Evil()}, bad / "model.pt")
    write_manifest(bad)  # as an attacker would: only the weights-only unpickling stands in the way
    with pytest.raises(ExportError, match="cannot read checkpoint file .*model.pt"):
        load_model_state(bad)
    assert not (tmp_path / "pwned").exists()

    # truncated safetensors in an export
    hf_bad = tmp_path / "hf_bad"
    shutil.copytree(exported[0], hf_bad)
    st = (hf_bad / "model.safetensors").read_bytes()
    (hf_bad / "model.safetensors").write_bytes(st[: len(st) // 3])
    with pytest.raises(ExportError, match="corrupt or truncated"):
        load_hf(str(hf_bad))
    # not a checkpoint at all
    with pytest.raises(ExportError, match="not a checkpoint"):
        load_model_state(tmp_path)


def test_fsdp2_dcp_checkpoint_round_trips_without_its_world_size(single, tmp_path):
    """FSDP2 on 2 ranks (uneven row shards) -> read in one process without a process group."""
    from pretrain.export import ExportError, export, load_model_state

    ckpt = _launch(tmp_path / "fsdp2", [], "engine.kind=fsdp2")
    sd, fmt = load_model_state(ckpt)
    assert fmt == "dcp"
    _close_to_single(sd, single[1])  # the same training, so the same weights
    report = export(str(ckpt), str(tmp_path / "hf"), verify_tokenizer=False)
    assert report.source_format == "dcp" and report.max_abs_diff < 1e-4
    # a truncated shard is refused with a clear error
    shard = sorted((ckpt / "dcp").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ExportError, match=f"{shard.name}: 100 bytes, manifest.json says"):
        load_model_state(ckpt)
    (ckpt / "manifest.json").unlink()  # a checkpoint from before manifests: DCP's read refuses it
    with pytest.raises(ExportError, match="DCP"):
        load_model_state(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_checkpoint_round_trips(single, tmp_path, stage):
    """DeepSpeed ZeRO-0/1/2/3 on 2 ranks -> merged in one process (weights_only loads)."""
    pytest.importorskip("deepspeed")
    from pretrain.export import export, load_model_state

    ckpt = _launch(tmp_path / "ds", [], "engine.kind=deepspeed", f"engine.zero_stage={stage}")
    sd, fmt = load_model_state(ckpt)
    assert fmt == "deepspeed"
    _close_to_single(sd, single[1])
    report = export(str(ckpt), str(tmp_path / "hf"), verify_tokenizer=False)
    assert report.max_abs_diff < 1e-4


@pytest.mark.slow
def test_ddp_checkpoint_round_trips(single, tmp_path):
    from pretrain.export import export, load_model_state

    ckpt = _launch(tmp_path / "ddp", [], "engine.kind=ddp")
    _close_to_single(load_model_state(ckpt)[0], single[1])
    assert export(str(ckpt), str(tmp_path / "hf"), verify_tokenizer=False).max_abs_diff < 1e-4


def test_bert_exports_to_megatron_bert_for_masked_lm(tmp_path, model_parallel_tp1):
    """BERT (pre-LN) -> MegatronBertForMaskedLM, validated on logits."""
    from pretrain.export import export
    from pretrain.models import build_bert, get_preset

    cfg = get_preset("tiny", "bert", hidden_dropout=0.0, attention_dropout=0.0, vocab_size=8192)
    model = build_bert(cfg, seed=3)
    with torch.no_grad():  # non-trivial biases and norms, so a missed mapping would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / "model.pt")
    (ckpt / "trainer.json").write_text(json.dumps({"step": 1}))
    (tmp_path / "run" / "config.json").write_text(json.dumps({
        "model": {"kind": "bert", "preset": "tiny", "overrides": {"hidden_dropout": 0.0, "attention_dropout": 0.0}},
        "data": {"tokenizer": TOKENIZER}, "train": {"seq_length": 64}}))
    report = export(str(ckpt), str(tmp_path / "hf"), verify_tokenizer=False)
    assert report.hf_class == "MegatronBertForMaskedLM" and report.max_abs_diff < 1e-4


def test_initial_weights_from_an_export_or_a_checkpoint(single, exported, model_parallel_tp1):
    """The helper behind the proposed model.init_from: both sources give the checkpoint's weights."""
    from pretrain.checkpoint import initial_weights
    from pretrain.export.hf import build_source_model, read_checkpoint

    cfg = read_checkpoint(str(single[0])).cfg
    for source in (exported[0], single[0]):
        sd = initial_weights(str(source), cfg)
        build_source_model(cfg, sd)  # loads strictly (all weights present)
        assert torch.equal(sd["decoder.layers.1.mlp.linear_fc1.weight"], single[1]["decoder.layers.1.mlp.linear_fc1.weight"])
