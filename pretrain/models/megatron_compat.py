"""Every place where this framework works around megatron-core on machines without CUDA, and
the GPU fast paths (fused kernels, stock / Transformer Engine attention) chosen in their place.

megatron-core 0.16.1 is written for GPUs. Measured on CPU (torch 2.13, gloo), these parts fail;
each line names the workaround that lives in this module and nowhere else:

1. ``DotProductAttention`` (the stock core attention) takes its score buffer from
   ``GlobalMemoryBuffer``, which allocates on ``torch.cuda.current_device()``
   (megatron/core/utils.py). -> ``SDPACoreAttention``: a drop-in core attention built on
   ``torch.nn.functional.scaled_dot_product_attention`` (which is also a fast path on GPU, where
   it dispatches to flash / memory-efficient kernels).
2. Attention dropout in the stock attention forks the CUDA RNG tracker, and
   ``model_parallel_cuda_manual_seed`` touches CUDA. -> ``SDPACoreAttention`` forks the tracker
   only when it was initialized (GPU); ``seed_all`` seeds the tracker only when CUDA is present.
   On CPU with TP>1 every tensor-parallel rank therefore draws attention dropout for its own heads
   from the same default generator: statistically harmless, and only on CPU.
3. ``BertModel`` checks its ``core_attention`` by identity against ``DotProductAttention`` and
   otherwise asks Transformer Engine for its version (bert_model.py), which fails without TE.
   -> ``bert_attention_mask_dims``, used by ``pretrain.models.bert.MegatronBert``.
4. Rotary embeddings fail on CPU (rotary_pos_embedding.py). Nothing to do: GPT-2 and BERT use
   learned absolute positions, fixed in ``pretrain.models.gpt`` / ``bert`` and not a config
   setting. A config that makes RoPE selectable must refuse it on CPU.
5. ``sequence_parallel=True`` needs a LayerNorm from Apex or TE (the torch LayerNorm wrapper
   asserts). Not exposed by our model configs.
6. Gathering tensor-parallel outputs (``gather_from_tensor_model_parallel_region``, used for
   full-vocabulary logits) allocates its buffer on ``torch.cuda.current_device()``
   (tensor_parallel/mappings.py). -> ``gather_last_dim``, device-agnostic, used by the logits
   helpers on every device (training losses stay vocab-parallel and never gather).
7. The jit-scripted fusions (bias+GeLU, bias+dropout+add) are GPU fast paths; on CPU they are
   slower than eager torch. -> ``fusion_flags`` turns them off unless CUDA is available.
8. megatron's linear autograd functions (``LinearWithGradAccumulationAndAsyncCommunication``,
   ``LinearWithFrozenWeight``) carry ``torch.amp.custom_fwd/custom_bwd(device_type="cuda")``, so
   under CPU autocast (``train.precision=bf16``) their backward runs without the forward's
   autocast state and multiplies a bf16 gradient by the fp32 weight (a dtype error).
   -> ``autocast_linears_on_cpu``: megatron's own undecorated functions re-decorated for "cpu".

Nothing here changes the model's function: each workaround computes what the stock GPU path
computes (up to which random numbers dropout draws on CPU).
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


def cuda_available() -> bool:
    """True when the fast GPU paths (fused kernels, stock/TE attention) may be used."""
    return torch.cuda.is_available()


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(name: str) -> str:
    """Map the config's ``attention_backend`` to a concrete one, refusing what cannot run here.

    ``auto``: Transformer Engine on GPU when installed, else SDPA (CPU and GPU without TE).
    ``sdpa``: ``SDPACoreAttention`` (works everywhere).
    ``local``: megatron-core's stock ``DotProductAttention`` (GPU only, see point 1 above).
    ``te``: ``TEDotProductAttention`` (GPU with Transformer Engine only).
    """
    if name == "auto":
        return "te" if cuda_available() and te_available() else "sdpa"
    if name == "sdpa":
        return name
    if name in ("local", "te"):
        if not cuda_available():
            raise ValueError(
                f"attention_backend={name!r} needs CUDA (megatron-core's {name} attention "
                "allocates on the GPU); use 'sdpa' or 'auto' on CPU"
            )
        if name == "te" and not te_available():
            raise ValueError("attention_backend='te' needs transformer_engine installed")
        return name
    raise ValueError(f"unknown attention_backend {name!r} (choose auto, sdpa, local or te)")


def fusion_flags(fused_kernels: Optional[bool]) -> dict:
    """TransformerConfig fusion switches: on for GPU (``None`` = decide by CUDA), off on CPU."""
    fused = cuda_available() if fused_kernels is None else fused_kernels
    if fused and not cuda_available():
        raise ValueError("fused_kernels=True needs CUDA; leave it unset (auto) on CPU")
    return {
        "bias_dropout_fusion": fused,
        "masked_softmax_fusion": fused,
        # Megatron's fused bias-GeLU is the tanh approximation; callers decide whether that
        # matches their activation (GPT-2: yes; BERT: no, it uses the exact erf GeLU).
        "bias_activation_fusion": fused,
        # Needs Apex's fused_weight_gradient_mlp_cuda and Megatron's own DDP buffers (main_grad);
        # our engines (DeepSpeed / FSDP2 / DDP) own gradients, so this stays off everywhere.
        "gradient_accumulation_fusion": False,
    }


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch; seed megatron's CUDA RNG tracker only where CUDA exists.

    Every tensor-parallel rank must use the same ``seed`` so that replicated tensors (layer norms,
    position embeddings, dropout on replicated activations) stay identical across the TP group.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if cuda_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


class SDPACoreAttention(MegatronModule):
    """Core attention (softmax(QK^T/sqrt(d)) V) via ``F.scaled_dot_product_attention``.

    Same constructor and forward signature as megatron-core's ``DotProductAttention`` so it slots
    into a layer spec's ``core_attention``. Inputs are megatron's ``[s, b, heads/TP, d]``; output
    is ``[s, b, hidden/TP]``. Masks follow megatron's convention: boolean, True = masked out.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPACoreAttention does not support apply_query_key_layer_scaling")
        if pg_collection is not None:
            tp_size = pg_collection.tp.size()
        else:
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None -> SDPA's default 1/sqrt(head_dim)

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        seq_len, batch = query.shape[0], query.shape[1]

        # [s, b, n, d] -> [b, n, s, d]: the layout SDPA expects (strided views, no copy here).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sdpa_kwargs = {}
        if self.groups_per_partition != self.heads_per_partition:
            sdpa_kwargs["enable_gqa"] = True

        # With no explicit mask a causal layer uses SDPA's built-in causal masking (no s x s
        # tensor). An explicit megatron mask (True = masked) is inverted to SDPA's (True = keep).
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal
        sdpa_mask = None if attention_mask is None else ~attention_mask

        dropout_p = self.dropout_p if self.training else 0.0
        tracker = tensor_parallel.get_cuda_rng_tracker()
        if dropout_p > 0.0 and cuda_available() and tracker.is_initialized():
            # GPU: per-TP-rank dropout streams, exactly like the stock attention.
            with tracker.fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=self.softmax_scale, **sdpa_kwargs,
                )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, **sdpa_kwargs,
            )
        # [b, n, s, d] -> [s, b, n*d]
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim over a process group; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = torch.distributed.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        world = torch.distributed.get_world_size(ctx.group)
        rank = torch.distributed.get_rank(ctx.group)
        return grad.chunk(world, dim=-1)[rank].contiguous(), None


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the TP ranks' last-dim shards (e.g. vocab-parallel logits); differentiable."""
    if group is None or torch.distributed.get_world_size(group) == 1:
        return x
    return _GatherLastDim.apply(x, group)


def bert_attention_mask_dims(core_attention: type) -> Optional[str]:
    """Mask layout BertModel must build for our SDPA attention, or None to keep megatron's logic.

    "b11s" ([b, 1, 1, s]) masks padded keys only; SDPA broadcasts it over queries. It also avoids
    fully masked query rows (padding queries), which would give NaN with SDPA.
    """
    return "b11s" if core_attention is SDPACoreAttention else None


def autocast_linears_on_cpu() -> None:
    """Item 8: megatron's linear functions keep the forward's autocast state for their backward
    on CPU too (idempotent; nothing changes where CUDA is available)."""
    if cuda_available():
        return
    for fn in (tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication,
               tensor_parallel.layers.LinearWithFrozenWeight):
        if getattr(fn, "_memopt_cpu_autocast", False):
            continue
        # custom_fwd/custom_bwd keep the undecorated function as __wrapped__ (functools.wraps).
        fn.forward = staticmethod(torch.amp.custom_fwd(fn.forward.__wrapped__, device_type="cpu"))
        fn.backward = staticmethod(torch.amp.custom_bwd(fn.backward.__wrapped__, device_type="cpu"))
        fn._memopt_cpu_autocast = True


autocast_linears_on_cpu()
