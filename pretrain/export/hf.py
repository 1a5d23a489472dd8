"""Checkpoint -> Hugging Face export (and back), validated by comparing logits.

    export(ckpt_dir, out_dir)      # config.json, model.safetensors, tokenizer; validated
    import_gpt2(hf_dir, out_dir)   # a GPT2LMHeadModel dir -> a step_00000000 checkpoint; validated

Validation loads the *written files* back with transformers (``from_pretrained``) and compares
fp32 logits with our megatron-core model holding the source weights on a fixed batch; above
``tol`` (max abs diff, default 1e-4) it raises ``ValidationError``. GPT goes to
``GPT2LMHeadModel``; BERT to ``MegatronBertForMaskedLM`` (pre-LayerNorm like ours; HF's
``BertForMaskedLM`` is post-LN and would not compute the same function). The binary
(sentence-order) head and pooler are not part of a masked-LM export.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from pretrain import checkpoint
from pretrain.checkpoint import Source
from pretrain.models.config import GPTConfig
from pretrain.models.hf_compat import (HFCompatError, IncompleteHFWeights, bert_to_hf, gpt_config_from_hf, gpt_to_hf,
                                       hf_classes, hf_to_gpt, load_hf_model)

from .errors import ExportError
from .readers import as_export_error, load_model_state

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOL = 1e-4


class ValidationError(ExportError):
    """The export does not compute what the source model computes."""


@dataclass
class Report:
    kind: str
    source_format: str
    max_abs_diff: float
    tol: float
    hf_class: str
    out_dir: str
    tokenizer: dict = field(default_factory=dict)

    def to_dict(self):
        return dict(self.__dict__)


# -- the source model ---------------------------------------------------------------------------

def ensure_model_parallel() -> None:
    from megatron.core import parallel_state

    from pretrain.models import init_model_parallel

    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(1)


def build_source_model(cfg, state_dict: Dict[str, torch.Tensor]):
    """Our model (TP=1, fp32, eval mode) holding ``state_dict``; every weight must be used."""
    from pretrain.models import build_model

    ensure_model_parallel()
    model = build_model(cfg, seed=0).float().eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ExportError(f"checkpoint does not match the run's architecture: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model


def read_checkpoint(ckpt: str, run_config: Optional[str] = None, tokenizer: Optional[str] = None) -> Source:
    """Everything needed to rebuild the model of checkpoint ``ckpt`` (any engine); see
    ``pretrain.checkpoint.read_checkpoint``."""
    with as_export_error():
        return checkpoint.read_checkpoint(ckpt, run_config, tokenizer)


# -- fixed validation batch ---------------------------------------------------------------------

def validation_batch(cfg, batch: int = 2) -> torch.Tensor:
    """A fixed batch [batch, seq_length] of token ids (seeded, the same every run)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=g)


@torch.no_grad()
def source_logits(model, cfg, tokens: torch.Tensor) -> torch.Tensor:
    from pretrain.models import bert_logits, gpt_logits

    if isinstance(cfg, GPTConfig):
        return gpt_logits(model, tokens).float()
    return bert_logits(model, tokens, torch.ones_like(tokens))[0].float()


@torch.no_grad()
def hf_logits(hf_model, cfg, tokens: torch.Tensor) -> torch.Tensor:
    if isinstance(cfg, GPTConfig):
        return hf_model(input_ids=tokens).logits.float()
    return hf_model(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                    token_type_ids=torch.zeros_like(tokens)).logits.float()


def compare(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> float:
    if a.shape != b.shape:
        raise ValidationError(f"{what}: logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = float((a - b).abs().max())
    if not diff <= tol:  # also catches NaN
        raise ValidationError(f"{what}: max abs logit difference {diff:.3e} exceeds tolerance {tol:.0e}: "
                              "the export does NOT compute the same function as the source model")
    return diff


# -- export -------------------------------------------------------------------------------------

def hf_state_and_config(src: Source):
    """HF state dict + config for ``src``; returns (state, config, hf class name)."""
    if src.kind == "gpt":
        hf_sd, hf_cfg = gpt_to_hf(src.state_dict, src.cfg)
        return hf_sd, hf_cfg, "GPT2LMHeadModel"
    hf_sd, hf_cfg = bert_to_hf(src.state_dict, src.cfg)
    hf_sd = {k: v for k, v in hf_sd.items() if k.startswith(("bert.embeddings", "bert.encoder", "cls.predictions"))}
    return hf_sd, hf_cfg, "MegatronBertForMaskedLM"


# bos is </s> as in the tokenizer (pretrain/export/tokenizer.py): what starts a document here
SENTENCEPIECE_SPECIAL_IDS = {"bos_token_id": 3, "eos_token_id": 3, "pad_token_id": 0}


def write_hf(src: Source, out_dir: str, transform: Optional[Callable] = None,
             special_ids: Optional[Dict[str, int]] = None) -> str:
    """Write config.json + model.safetensors (+ generation_config.json) for ``src``.
    ``transform`` (tests) may alter the mapped HF state dict before it is written;
    ``special_ids``: bos/eos/pad of the export's tokenizer (default: the sentencepiece models')."""
    hf_sd, hf_cfg, cls_name = hf_state_and_config(src)
    if transform is not None:
        hf_sd = transform(hf_sd)
    cfg_cls, model_cls = hf_classes(cls_name)
    config = cfg_cls(**hf_cfg, architectures=[cls_name], **(special_ids or SENTENCEPIECE_SPECIAL_IDS))
    model = model_cls(config)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    tied = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    missing = [k for k in missing if k not in tied and not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(f"weight mapping incomplete for {cls_name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return cls_name


def load_hf(out_dir: str, cls_name: Optional[str] = None):
    """Load an export with transformers (safetensors only; never pickles); weights that do not
    fill the class fail validation."""
    try:
        return load_hf_model(out_dir, cls_name)
    except IncompleteHFWeights as e:
        raise ValidationError(str(e)) from None
    except HFCompatError as e:
        raise ExportError(str(e)) from None


def validate_export(src: Source, out_dir: str, tol: float = DEFAULT_TOL) -> float:
    """Max abs logit diff between the source weights (our model) and the written export."""
    model = build_source_model(src.cfg, src.state_dict)
    tokens = validation_batch(src.cfg)
    ref = source_logits(model, src.cfg, tokens)
    hf = load_hf(out_dir)
    return compare(ref, hf_logits(hf, src.cfg, tokens), tol, f"export {out_dir}")


def export(ckpt: str, out_dir: str, run_config: Optional[str] = None, tokenizer: Optional[str] = None,
           tol: float = DEFAULT_TOL, transform: Optional[Callable] = None, verify_tokenizer: bool = True) -> Report:
    """Convert checkpoint ``ckpt`` (any engine) to a validated HF directory ``out_dir``."""
    from pretrain.data.tokenizer import load_tokenizer

    from .hf_tokenizer import is_hf_tokenizer, save_hf_tokenizer, special_ids
    from .tokenizer import save_tokenizer

    src = read_checkpoint(ckpt, run_config, tokenizer)
    if is_hf_tokenizer(src.tokenizer):  # GPT-2 BPE or a HF tokenizer directory: saved as is
        cls_name = write_hf(src, out_dir, transform, special_ids(load_tokenizer(src.tokenizer)))
        tok_info = save_hf_tokenizer(src.tokenizer, out_dir, src.cfg.seq_length, verify=verify_tokenizer)
    else:
        cls_name = write_hf(src, out_dir, transform)
        tok_info = save_tokenizer(src.tokenizer, out_dir, src.cfg.seq_length, verify=verify_tokenizer)
    diff = validate_export(src, out_dir, tol)
    report = Report(kind=src.kind, source_format=src.fmt, max_abs_diff=diff, tol=tol, hf_class=cls_name,
                    out_dir=str(out_dir), tokenizer=tok_info)
    (Path(out_dir) / "export_report.json").write_text(json.dumps(dict(report.to_dict(), source=str(ckpt), step=src.step),
                                                                  indent=1))
    return report


# -- reverse: HF GPT-2 -> our checkpoint --------------------------------------------------------

def import_gpt2(hf_dir: str, out_dir: str, base_config: Optional[str] = None, overrides=(),
                tokenizer: Optional[str] = None, tol: float = DEFAULT_TOL) -> dict:
    """A local ``GPT2LMHeadModel`` directory -> ``out_dir/checkpoints/step_00000000`` in the
    single-process format (model.pt, fresh optimizer.pt / scheduler.pt, trainer.json, config.json,
    manifest; written by ``pretrain.checkpoint``, no training engine involved) plus
    ``out_dir/config.json``, so ``checkpoint.resume=<that path>`` (or ``auto`` with
    ``output_dir=out_dir``) continues pretraining from the HF weights. Validated: our model with
    the converted weights must give the HF model's logits within ``tol``."""
    import memopt

    from pretrain.config import dump_config, load_run_config
    from pretrain.optim import build_scheduler, optimizer_kwargs

    hf = load_hf(hf_dir, "GPT2LMHeadModel")
    with as_export_error():
        cfg = gpt_config_from_hf(hf.config)
    sd = hf_to_gpt(hf.state_dict(), cfg)
    model = build_source_model(cfg, sd)
    tokens = validation_batch(cfg)
    diff = compare(hf_logits(hf, cfg, tokens), source_logits(model, cfg, tokens), tol, f"import {hf_dir}")

    tok = tokenizer or (str(Path(hf_dir) / "tokenizer.model") if (Path(hf_dir) / "tokenizer.model").is_file() else None)
    arch = {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                                          "ffn_hidden_size", "init_method_std")}
    # Only when it differs from the default: the run's config.json is JSON (1e-05) read back as
    # YAML 1.1, where an exponent without a dot is a string.
    if cfg.layernorm_epsilon != GPTConfig.__dataclass_fields__["layernorm_epsilon"].default:
        arch["layernorm_epsilon"] = float(f"{cfg.layernorm_epsilon:.8e}")
    ov = [f"output_dir={out_dir}", "model.kind=gpt", "model.preset=tiny", "model.overrides={" + ", ".join(f"{k}: {v!r}" for k, v in arch.items()) + "}",
          f"train.seq_length={cfg.seq_length}"] + ([f"data.tokenizer={os.path.abspath(tok)}"] if tok else []) + list(overrides)
    run_cfg = load_run_config(base_config or str(ROOT / "configs/gpt_tiny.yaml"), ov)
    # The optimizer and schedule a run with this config starts with (their state is what
    # checkpoint.resume loads; only the parameter count and order of ``model`` matter to it).
    optimizer = memopt.create_optimizer(run_cfg.optimizer.name, model.parameters(), **optimizer_kwargs(run_cfg))
    scheduler = build_scheduler(optimizer, run_cfg.train.steps, run_cfg.schedule.warmup_steps, run_cfg.schedule.decay,
                                run_cfg.schedule.min_lr_ratio)
    config_json = dump_config(run_cfg)
    trainer_state = dict(step=0, consumed_samples=0, tokens=0, nonfinite_skipped_steps=0, world_size=1,
                         engine="single", imported_from=str(hf_dir))
    step_dir = checkpoint.write_single_checkpoint(Path(out_dir) / "checkpoints", 0, model.state_dict(), trainer_state,
                                                  config_json, optimizer.state_dict(), scheduler.state_dict())
    (Path(out_dir) / "config.json").write_text(config_json)
    # the written checkpoint reads back to the same function
    back, _ = load_model_state(step_dir)
    diff_back = compare(source_logits(build_source_model(cfg, back), cfg, tokens), hf_logits(hf, cfg, tokens), tol,
                        f"checkpoint {step_dir}")
    return dict(checkpoint=str(step_dir), max_abs_diff=max(diff, diff_back), tol=tol, config=str(Path(out_dir) / "config.json"))
