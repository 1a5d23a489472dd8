"""Name-keyed, world-size-independent optimizer state: ``full_state_dict`` / ``load_full_state_dict``.

The state of every logical parameter is stored under the parameter's *name* with every tensor at
its full logical shape, so a checkpoint written under one layout (one process, DDP, FSDP2 row
shards, DeepSpeed ZeRO flat partitions, any world size) loads under any other (docs/sharding.md,
"Checkpoints"). This module only uses the public contract of ``memopt.sharding``
(``LayoutOptimizer``: ``logical_params``, ``ensure_state``) and the layouts' gather/scatter
methods; it does not know the optimizers' internals.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .sharding import Layout, LayoutOptimizer, LogicalParam

FORMAT = "memopt-full-v1"


def _slots(opt: LayoutOptimizer, names: dict) -> Iterator[tuple[str, LogicalParam]]:
    """(name, logical parameter) for every logical parameter of ``opt``, in the same order on
    every rank. Bound fragments carry their names; other parameters are looked up in ``names``."""
    for lp in opt.logical_params():
        if isinstance(lp.key, str):
            yield lp.key, lp
            continue
        if lp.key not in names:
            raise KeyError(f"no name for a parameter of shape {tuple(lp.key.shape)}: pass names=model")
        yield names[lp.key], lp


def _param_names(model_or_names) -> dict:
    if model_or_names is None:
        return {}
    if isinstance(model_or_names, torch.nn.Module):
        return {p: n for n, p in model_or_names.named_parameters()}
    return dict(model_or_names)


def _kind_of(opt, key: str, layout: Layout) -> str:
    """How a state tensor is indexed: "elem" (like the parameter), "row" (by the rows of the
    (B*m, n) stack) or "col" (by matrix and column). Optimizers name it in ``state_kinds``;
    otherwise the suffixes _row/_col say it."""
    if not layout.factored:
        return "elem"
    declared = getattr(opt, "state_kinds", {}).get(key)
    if declared is not None:
        return declared
    if key.endswith("_row"):
        return "row"
    if key.endswith("_col"):
        return "col"
    return "elem"


def _extra_dims(v: torch.Tensor, layout: Layout, kind: str, local: bool) -> tuple:
    """Trailing dims per row / column of a row- or col-kind tensor (Adapprox's rank k; none for
    Adafactor's vectors). Local row tensors are (window, *extra); full ones and col tensors are
    (*full_shape[:-1], *extra) and (*full_shape[:-2], n, *extra)."""
    if kind == "row" and local and layout.sharded:
        return tuple(v.shape[1:])
    return tuple(v.shape[len(layout.full_shape) - 1:])


def full_state_dict(opt: LayoutOptimizer, names=None) -> dict:
    """The optimizer state keyed by parameter *name*, every tensor at its full logical shape.

    A collective when parameters are sharded: every rank must call it; every rank gets the same
    result (save it from one rank). ``names``: the model (its ``named_parameters``) or a
    {parameter: name} dict; DeepSpeed-bound partitions carry their names already. Restore with
    ``load_full_state_dict`` at any world size and any layout.
    """
    names = _param_names(names)
    out = {}
    for name, lp in _slots(opt, names):
        layout, st = lp.layout, lp.state
        if not st:
            continue
        entry = {}
        for key, v in st.items():
            if not torch.is_tensor(v):
                entry[key] = v
                continue
            kind = _kind_of(opt, key, layout)
            if kind == "elem":
                entry[key] = layout.gather_full(v) if layout.sharded else v.detach().clone()
                continue
            extra = _extra_dims(v, layout, kind, local=True)
            if kind == "row":
                shape = layout.full_shape[:-1] + extra
                if layout.kind == "flat":
                    entry[key] = layout.gather_from_holders(v, shape.numel()).view(shape)
                else:
                    entry[key] = layout.gather_rows(v, extra).view(shape)
            else:
                shape = layout.full_shape[:-2] + layout.full_shape[-1:] + extra
                if layout.kind == "flat":
                    entry[key] = layout.gather_from_holders(v, shape.numel()).view(shape)
                else:
                    entry[key] = v.detach().clone().view(shape)
        out[name] = entry
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    sd = {"state": out, "param_groups": groups, "format": FORMAT}
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is not None:
        sd["loss_scaler"] = dict(vars(scaler))
    return sd


def load_full_state_dict(opt: LayoutOptimizer, sd: dict, names=None) -> None:
    """Restore a ``full_state_dict`` into ``opt`` (any world size, any layout)."""
    if sd.get("format") != FORMAT:
        raise ValueError("not a memopt full optimizer state dict (memopt.checkpoint.full_state_dict)")
    names = _param_names(names)
    missing = []
    for name, lp in _slots(opt, names):
        entry = sd["state"].get(name)
        if entry is None:
            missing.append(name)
            continue
        layout, st = lp.layout, opt.ensure_state(lp)
        for key, v in entry.items():
            if not torch.is_tensor(v):
                st[key] = v
                continue
            cur = st.get(key)
            if cur is None:
                raise KeyError(f"{name}: saved state {key!r} is unknown to {type(opt).__name__}")
            if not torch.is_tensor(cur):
                # A counter saved by the sync-free path (a 0-d tensor) into a state holding ints:
                # either path reads both forms.
                st[key] = v.detach().clone()
                continue
            kind = _kind_of(opt, key, layout)
            extra = () if kind == "elem" else _extra_dims(v, layout, kind, local=False)
            if kind == "elem":
                new = layout.local_of(v) if layout.sharded else v
            elif kind == "row" and layout.sharded:
                new = layout.rows_of(v, extra)  # (window, *extra); a flat window is all rows
            else:
                new = v
            if key in getattr(opt, "resizable_state", ()):
                # Its trailing size (a rank) changes during training: take the saved tensor as it is.
                st[key] = new.to(device=cur.device, dtype=torch.float32).clone()
                continue
            if cur.numel() == 0 and new.numel() != 0:
                continue  # a factor this rank does not keep (it holds no element of the parameter)
            cur.copy_(new.reshape(cur.shape))
    if missing and len(missing) == sum(1 for _ in _slots(opt, names)):
        raise KeyError(f"no saved state matches these parameters (e.g. {missing[0]!r})")
    if len(sd["param_groups"]) == len(opt.param_groups):
        for g, saved in zip(opt.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k in g})
    if "loss_scaler" in sd and getattr(opt, "loss_scaler", None) is not None:
        for k, v in sd["loss_scaler"].items():
            setattr(opt.loss_scaler, k, v)
