"""The model weights of any engine's checkpoint as one full (unsharded) state dict, and what is
needed to rebuild that model (``read_checkpoint``) or to start a run from it (``initial_weights``).

No process group and no knowledge of the world size that wrote the checkpoint is needed:

- single process / DDP: ``step_N/model.pt`` (``torch.load(weights_only=True)``)
- FSDP2: ``step_N/dcp`` (torch DCP), read with ``no_dist=True``; the ``.metadata`` file is a
  pickle, read here with an unpickler that only admits DCP's own metadata classes.
- DeepSpeed under tensor parallelism: ``step_N/model_full.pt`` (full TP=1 weights by name)
- DeepSpeed stage 0: ``step_N/deepspeed/mp_rank_00_model_states.pt`` (``module``)
- DeepSpeed ZeRO 1-3: the fp32 master partitions in ``*_optim_states.pt``, merged by DeepSpeed's
  ``zero_to_fp32``; DeepSpeed calls ``torch.load(weights_only=False)`` there, so it runs inside
  ``pretrain.checkpoint.weights_only_torch_load`` (``weights_only=True`` forced, DeepSpeed's few
  plain data classes allow-listed): no arbitrary code can run.

The checkpoint's manifest (checksums) is verified first. A missing, truncated or corrupt file
raises ``CheckpointError`` naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from pretrain.errors import CheckpointError

from . import layout
from .manifest import verify_checkpoint
from .run_config import find_run_config, model_config, read_run_config, read_trainer_state, tokenizer_path
from .safe_load import first_error_line, safe_dcp_reader, safe_torch_load, weights_only_torch_load


def load_model_state(ckpt: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(state_dict, format)`` of the model in checkpoint directory ``ckpt`` (a ``step_N``)."""
    ckpt = Path(ckpt)
    fmt = layout.detect_format(ckpt)
    problem = verify_checkpoint(ckpt)  # checksums first: never convert a damaged checkpoint
    if problem:
        raise CheckpointError(f"{ckpt} fails verification: {problem}")
    if fmt == "torch":
        sd = safe_torch_load(ckpt / layout.MODEL_FILE)
    elif fmt == "dcp":
        sd = _load_dcp(ckpt / layout.DCP_DIR)
    else:
        sd = _load_deepspeed(ckpt)
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{ckpt}: no model weights found")
    out = {}
    for k, v in sd.items():
        if k.endswith("_extra_state"):
            continue
        if not torch.is_tensor(v):
            raise CheckpointError(f"{ckpt}: entry {k!r} is not a tensor")
        out[k] = v.detach().to(torch.float32) if v.is_floating_point() else v.detach()
    return out, fmt


# -- FSDP2 / DCP ------------------------------------------------------------------------------

def _load_dcp(path: Path) -> Dict[str, torch.Tensor]:
    """The ``model`` part of a DCP checkpoint, in this process, without a process group."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = safe_dcp_reader(path)
    metadata = reader.read_metadata()
    model_keys = [k for k in metadata.state_dict_metadata if k.startswith("model.")]
    if not model_keys:
        raise CheckpointError(f"{path}: DCP checkpoint has no 'model' entries")
    sd: dict = {}
    try:
        # Only the model's tensors are read (keys=...), not the optimizer state.
        _load_state_dict(sd, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        raise CheckpointError(f"cannot read DCP checkpoint {path} (corrupt or truncated shard?): {type(e).__name__}: "
                              f"{first_error_line(e)}") from None
    model = sd.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: DCP checkpoint has no 'model' state")
    return model


# -- DeepSpeed ----------------------------------------------------------------------------------

def _load_deepspeed(ckpt: Path) -> Dict[str, torch.Tensor]:
    if (ckpt / layout.DEEPSPEED_MODEL_FULL_FILE).is_file():  # written under tensor parallelism
        return safe_torch_load(ckpt / layout.DEEPSPEED_MODEL_FULL_FILE)
    ds_dir = ckpt / layout.DEEPSPEED_TAG
    files = sorted(p.name for p in ds_dir.glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{ds_dir}: no DeepSpeed *model_states.pt files")
    try:
        import deepspeed.utils.zero_to_fp32 as z2f
    except ImportError:
        raise CheckpointError("reading a DeepSpeed checkpoint needs the deepspeed package") from None
    # zero_to_fp32 calls torch.load(weights_only=False): forced to weights_only in this block.
    with weights_only_torch_load():
        states = torch.load(ds_dir / files[0], map_location="cpu")
        stage = _zero_stage(ds_dir)
        if stage == 0:
            module = states.get("module") if isinstance(states, dict) else None
            if not isinstance(module, dict):
                raise CheckpointError(f"{ds_dir / files[0]}: no 'module' state")
            return module
        try:
            return z2f.get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=layout.DEEPSPEED_TAG)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot merge the ZeRO-{stage} checkpoint in {ds_dir}: {type(e).__name__}: {e}") from None


def _zero_stage(ds_dir: Path) -> int:
    optim = sorted(ds_dir.glob("*optim_states.pt"))
    if not optim:
        return 0
    # The stage is recorded in the optimizer files; a small read of the first one.
    sd = torch.load(optim[0], map_location="cpu")  # inside weights_only_torch_load
    osd = sd.get("optimizer_state_dict", {}) if isinstance(sd, dict) else {}
    stage = osd.get("zero_stage", 0)
    return int(getattr(stage, "value", stage))


# -- what the checkpoint's weights are for ---------------------------------------------------------

@dataclass
class Source:
    """A checkpoint's model, ready to be rebuilt (fp32 weights, inference config)."""

    kind: str
    cfg: object
    state_dict: Dict[str, torch.Tensor]
    fmt: str
    tokenizer: str
    step: int


def read_checkpoint(ckpt: str, run_config: Optional[str] = None, tokenizer: Optional[str] = None) -> Source:
    """Everything needed to rebuild the model of checkpoint ``ckpt`` (any engine)."""
    from pretrain.data.tokenizer import load_tokenizer

    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    cfg_path = Path(run_config) if run_config else find_run_config(ckpt)
    run_cfg = read_run_config(cfg_path)
    tok_path = tokenizer or tokenizer_path(run_cfg, cfg_path)
    tok = load_tokenizer(tok_path)  # sentencepiece, GPT-2 BPE or a HF tokenizer directory
    cfg = model_config(run_cfg, tok.vocab_size, for_inference=True)
    sd, fmt = load_model_state(ckpt)
    return Source(kind=cfg.kind, cfg=cfg, state_dict=sd, fmt=fmt, tokenizer=tok_path, step=int(state.get("step", 0)))


def initial_weights(path: str, cfg) -> Dict[str, torch.Tensor]:
    """Weights to start a run from (``model.init_from``): a checkpoint step dir of any engine, or
    a local GPT2LMHeadModel directory (converted). The architecture must match ``cfg``."""
    from pretrain.models.config import GPTConfig
    from pretrain.models.hf_compat import gpt_config_from_hf, hf_architecture, hf_to_gpt, load_hf_model

    arch = hf_architecture(path)
    if arch == "GPT2LMHeadModel":
        hf = load_hf_model(str(path), arch)
        hf_cfg = gpt_config_from_hf(hf.config)
        if not isinstance(cfg, GPTConfig) or (hf_cfg.num_layers, hf_cfg.hidden_size, hf_cfg.num_attention_heads,
                                              hf_cfg.vocab_size) != (cfg.num_layers, cfg.hidden_size,
                                                                     cfg.num_attention_heads, cfg.vocab_size):
            raise CheckpointError(f"{path}: architecture differs from the run's model config")
        return hf_to_gpt(hf.state_dict(), cfg)
    return load_model_state(Path(path))[0]
