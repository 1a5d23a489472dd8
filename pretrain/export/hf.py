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

from pretrain.models.config import BertConfig, GPTConfig, get_preset
from pretrain.models.hf_compat import bert_to_hf, gpt_to_hf

from .errors import ExportError
from .readers import find_run_config, load_model_state, read_trainer_state

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

def resolve_path(p: str, base: Optional[Path] = None) -> str:
    """A path from a run config: as given, else relative to the config's dir, else the repo root."""
    cands = [Path(p)] + ([base / p] if base else []) + [ROOT / p]
    for c in cands:
        if c.exists():
            return str(c)
    raise ExportError(f"{p}: not found (tried {', '.join(str(c) for c in cands)})")


def model_config_from_run(run_cfg: dict, tokenizer_vocab: Optional[int]):
    """The architecture the trainer built for this run config (same rules as pretrain.train.trainer)."""
    m = run_cfg.get("model", {})
    kind = m.get("kind", "gpt")
    overrides = dict(m.get("overrides", {}))
    if tokenizer_vocab is not None:
        overrides.setdefault("vocab_size", tokenizer_vocab)
    seq = run_cfg.get("train", {}).get("seq_length")
    if seq:
        overrides["seq_length"] = seq
    # Evaluation is deterministic and runs on CPU: no dropout, SDPA attention.
    overrides.update(hidden_dropout=0.0, attention_dropout=0.0)
    overrides["attention_backend"] = "sdpa"  # same weights under every backend; sdpa runs anywhere
    return get_preset(m.get("preset", "demo"), kind, **overrides)


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


@dataclass
class Source:
    kind: str
    cfg: object
    state_dict: Dict[str, torch.Tensor]
    fmt: str
    tokenizer: str
    step: int


def read_checkpoint(ckpt: str, run_config: Optional[str] = None, tokenizer: Optional[str] = None) -> Source:
    """Everything needed to rebuild the model of checkpoint ``ckpt`` (any engine)."""
    from pretrain.data.tokenizer import SentencePieceTokenizer

    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    cfg_path = Path(run_config) if run_config else find_run_config(ckpt)
    try:
        run_cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read run config {cfg_path}: {e}") from None
    tok_path = tokenizer or resolve_path(run_cfg.get("data", {}).get("tokenizer", "data/tokenizer/spm_bpe_8k.model"),
                                         cfg_path.parent)
    tok = SentencePieceTokenizer(tok_path)
    cfg = model_config_from_run(run_cfg, tok.vocab_size)
    sd, fmt = load_model_state(ckpt)
    return Source(kind=cfg.kind, cfg=cfg, state_dict=sd, fmt=fmt, tokenizer=tok_path, step=int(state.get("step", 0)))


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


def _hf_classes(name: str):
    import transformers

    cfg_cls = {"GPT2LMHeadModel": transformers.GPT2Config,
               "MegatronBertForMaskedLM": transformers.MegatronBertConfig}[name]
    return cfg_cls, getattr(transformers, name)


def write_hf(src: Source, out_dir: str, transform: Optional[Callable] = None) -> str:
    """Write config.json + model.safetensors for ``src``. ``transform`` (tests) may alter the
    mapped HF state dict before it is written."""
    hf_sd, hf_cfg, cls_name = hf_state_and_config(src)
    if transform is not None:
        hf_sd = transform(hf_sd)
    cfg_cls, model_cls = _hf_classes(cls_name)
    config = cfg_cls(**hf_cfg, architectures=[cls_name], bos_token_id=2, eos_token_id=3, pad_token_id=0)
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
    """Load an export with transformers (safetensors only; never pickles)."""
    cfg_path = Path(out_dir) / "config.json"
    if cls_name is None:
        try:
            cls_name = json.loads(cfg_path.read_text())["architectures"][0]
        except (OSError, json.JSONDecodeError, KeyError, IndexError) as e:
            raise ExportError(f"{cfg_path}: cannot read the export's config: {e}") from None
    _, model_cls = _hf_classes(cls_name)
    if not (Path(out_dir) / "model.safetensors").is_file():
        raise ExportError(f"{out_dir}: no model.safetensors")
    try:
        model, info = model_cls.from_pretrained(out_dir, use_safetensors=True, dtype=torch.float32,
                                                output_loading_info=True, local_files_only=True)
    except Exception as e:
        raise ExportError(f"cannot load the export {out_dir} with transformers (corrupt or truncated?): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise ValidationError(f"{out_dir}: export does not fill {cls_name}: missing {missing[:5]}, "
                              f"unexpected {info.get('unexpected_keys', [])[:5]}, mismatched {info.get('mismatched_keys', [])[:5]}")
    return model.eval()


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
    from .tokenizer import save_tokenizer

    src = read_checkpoint(ckpt, run_config, tokenizer)
    cls_name = write_hf(src, out_dir, transform)
    tok_info = save_tokenizer(src.tokenizer, out_dir, src.cfg.seq_length, verify=verify_tokenizer)
    diff = validate_export(src, out_dir, tol)
    report = Report(kind=src.kind, source_format=src.fmt, max_abs_diff=diff, tol=tol, hf_class=cls_name,
                    out_dir=str(out_dir), tokenizer=tok_info)
    (Path(out_dir) / "export_report.json").write_text(json.dumps(dict(report.to_dict(), source=str(ckpt), step=src.step),
                                                                  indent=1))
    return report


# -- reverse: HF GPT-2 -> our checkpoint --------------------------------------------------------

def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of ``hf_compat.split_qkv``: [all q][all k][all v] -> per-head [q k v] groups."""
    rest = q.shape[1:]
    parts = [t.reshape(num_heads, t.shape[0] // num_heads, *rest) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(-1, *rest)


def gpt_config_from_hf(hf_cfg) -> GPTConfig:
    act = getattr(hf_cfg, "activation_function", "gelu_new")
    problems = []
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={act!r} (ours is tanh-GeLU)")
    if not getattr(hf_cfg, "tie_word_embeddings", True):
        problems.append("untied output embeddings")
    if getattr(hf_cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf_cfg, "scale_attn_weights", True):
        problems.append("non-standard attention scaling")
    if problems:
        raise ExportError("this GPT2LMHeadModel cannot be represented exactly: " + "; ".join(problems))
    return GPTConfig(num_layers=hf_cfg.n_layer, hidden_size=hf_cfg.n_embd, num_attention_heads=hf_cfg.n_head,
                     seq_length=hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size,
                     ffn_hidden_size=hf_cfg.n_inner or 4 * hf_cfg.n_embd, layernorm_epsilon=hf_cfg.layer_norm_epsilon,
                     hidden_dropout=0.0, attention_dropout=0.0, init_method_std=hf_cfg.initializer_range,
                     attention_backend="sdpa")


def hf_to_gpt(hf_sd: Dict[str, torch.Tensor], cfg: GPTConfig) -> Dict[str, torch.Tensor]:
    """Inverse of ``hf_compat.gpt_to_hf``: GPT2LMHeadModel weights -> our names (padded vocab
    rows are zeros; they never reach the logits)."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in hf_sd.items()}
    wte = sd["wte.weight"]
    word = torch.zeros(cfg.padded_vocab_size, cfg.hidden_size, dtype=wte.dtype)
    word[: cfg.vocab_size] = wte
    out = {
        "embedding.word_embeddings.weight": word,
        "embedding.position_embeddings.weight": sd["wpe.weight"],
        "decoder.final_layernorm.weight": sd["ln_f.weight"],
        "decoder.final_layernorm.bias": sd["ln_f.bias"],
    }
    h, n = cfg.hidden_size, cfg.num_attention_heads
    for i in range(cfg.num_layers):
        s, d = f"h.{i}.", f"decoder.layers.{i}."
        w = sd[s + "attn.c_attn.weight"].t()
        b = sd[s + "attn.c_attn.bias"]
        out.update({
            d + "input_layernorm.weight": sd[s + "ln_1.weight"],
            d + "input_layernorm.bias": sd[s + "ln_1.bias"],
            d + "self_attention.linear_qkv.weight": merge_qkv(w[:h], w[h:2 * h], w[2 * h:], n),
            d + "self_attention.linear_qkv.bias": merge_qkv(b[:h], b[h:2 * h], b[2 * h:], n),
            d + "self_attention.linear_proj.weight": sd[s + "attn.c_proj.weight"].t(),
            d + "self_attention.linear_proj.bias": sd[s + "attn.c_proj.bias"],
            d + "pre_mlp_layernorm.weight": sd[s + "ln_2.weight"],
            d + "pre_mlp_layernorm.bias": sd[s + "ln_2.bias"],
            d + "mlp.linear_fc1.weight": sd[s + "mlp.c_fc.weight"].t(),
            d + "mlp.linear_fc1.bias": sd[s + "mlp.c_fc.bias"],
            d + "mlp.linear_fc2.weight": sd[s + "mlp.c_proj.weight"].t(),
            d + "mlp.linear_fc2.bias": sd[s + "mlp.c_proj.bias"],
        })
    return {k: v.float().contiguous().clone() for k, v in out.items()}


def import_gpt2(hf_dir: str, out_dir: str, base_config: Optional[str] = None, overrides=(),
                tokenizer: Optional[str] = None, tol: float = DEFAULT_TOL) -> dict:
    """A local ``GPT2LMHeadModel`` directory -> ``out_dir/checkpoints/step_00000000`` in the
    single-process format (model.pt, fresh optimizer.pt / scheduler.pt, trainer.json) plus
    ``out_dir/config.json``, so ``checkpoint.resume=<that path>`` (or ``auto`` with
    ``output_dir=out_dir``) continues pretraining from the HF weights. Validated: our model with
    the converted weights must give the HF model's logits within ``tol``."""
    from pretrain.config import dump_config, load_run_config
    from pretrain.train.engines import SingleEngine

    hf = load_hf(hf_dir, "GPT2LMHeadModel")
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
    # the run's own dropout settings apply when training (the model above was built without)
    full_overrides = dict(run_cfg.model.overrides)
    run_cfg.model.overrides = full_overrides
    train_model = build_source_model(cfg, sd).train()
    engine = SingleEngine(train_model, run_cfg)
    step_dir = Path(out_dir) / "checkpoints" / "step_00000000"
    step_dir.mkdir(parents=True, exist_ok=True)
    engine.save(step_dir)
    (Path(out_dir) / "config.json").write_text(dump_config(run_cfg))
    (step_dir / "trainer.json").write_text(json.dumps(dict(step=0, consumed_samples=0, tokens=0, nonfinite_skipped_steps=0,
                                                           world_size=1, engine="single", imported_from=str(hf_dir)),
                                                      indent=1))
    # the written checkpoint reads back to the same function
    back, _ = load_model_state(step_dir)
    diff_back = compare(source_logits(build_source_model(cfg, back), cfg, tokens), hf_logits(hf, cfg, tokens), tol,
                        f"checkpoint {step_dir}")
    return dict(checkpoint=str(step_dir), max_abs_diff=max(diff, diff_back), tol=tol, config=str(Path(out_dir) / "config.json"))


def initial_weights(path: str, cfg) -> Dict[str, torch.Tensor]:
    """Weights to start a run from (``model.init_from``, loaded by the trainer before the engine
    shards parameters): a checkpoint step dir of any engine, or a local GPT2LMHeadModel directory
    (converted). The architecture must match ``cfg``."""
    p = Path(path)
    arch = None
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        try:
            arch = json.loads((p / "config.json").read_text()).get("architectures", [None])[0]
        except (OSError, json.JSONDecodeError):
            arch = None
    if arch == "GPT2LMHeadModel":
        hf = load_hf(str(p), arch)
        hf_cfg = gpt_config_from_hf(hf.config)
        if not isinstance(cfg, GPTConfig) or (hf_cfg.num_layers, hf_cfg.hidden_size, hf_cfg.num_attention_heads,
                                              hf_cfg.vocab_size) != (cfg.num_layers, cfg.hidden_size,
                                                                     cfg.num_attention_heads, cfg.vocab_size):
            raise ExportError(f"{path}: architecture differs from the run's model config")
        return hf_to_gpt(hf.state_dict(), cfg)
    return load_model_state(p)[0]
