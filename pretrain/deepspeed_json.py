"""The ``optimizer`` and ``scheduler`` sections of a user's DeepSpeed JSON (engine.deepspeed_config).

Megatron-DeepSpeed users bring a ds.json whose ``optimizer`` section picks the optimizer. Here the
optimizer is built from ``optimizer.*`` of the run config, so the section is turned into those
keys when the config is loaded (the saved config.json and the resume checks then see what runs):

- DeepSpeed's ``Adam`` / ``AdamW`` (AdamW semantics: ``adam_w_mode`` true, DeepSpeed's default)
  become ``adamw`` with ``params.lr`` as ``optimizer.lr`` and betas/eps/weight_decay as hparams;
- a memopt name (``adalomo``, ``came``, ...) selects that optimizer, its params as hparams;
- any other type (Lamb, OneBitAdam, ...) is refused with one line.

The JSON overrides the YAML file's ``optimizer`` section; a command-line override that disagrees
with it is refused, as is a ``scheduler`` section (the schedule is ``schedule.*``), so nothing in
the file is silently dropped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# DeepSpeed's implementation switches: the same update whichever is chosen.
_IMPLEMENTATION_PARAMS = {"torch_adam", "fused", "adam_w_mode", "bias_correction"}
_ADAM_TYPES = {"adam", "adamw", "fusedadam", "cpuadam", "deepspeedcpuadam"}


class DeepSpeedJSONError(ValueError):
    """A DeepSpeed JSON section this trainer cannot honour; one line."""


def read_deepspeed_json(path: str) -> dict | None:
    """The parsed file, or None when it is missing (the config check reports that)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        ds = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeepSpeedJSONError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(ds, dict):
        raise DeepSpeedJSONError(f"{path}: the top level must be a JSON object")
    return ds


def optimizer_from_json(section: Any, path: str) -> dict:
    """``{"name", "lr"?, "hparams"}`` for the run config from a DeepSpeed ``optimizer`` section."""
    from memopt.registry import OPTIMIZERS, optimizer_hparams

    if not isinstance(section, dict) or not isinstance(section.get("type"), str):
        raise DeepSpeedJSONError(f'{path}: the "optimizer" section needs a "type" string')
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise DeepSpeedJSONError(f'{path}: optimizer "params" must be an object')
    given = section["type"]
    kind = given.lower()
    supported = f"DeepSpeed's Adam, AdamW, or a memopt optimizer ({', '.join(OPTIMIZERS)})"
    if kind in _ADAM_TYPES:
        if params.get("adam_w_mode", True) is False or params.get("bias_correction", True) is False:
            raise DeepSpeedJSONError(f'{path}: optimizer {given} with adam_w_mode or bias_correction false is not '
                                     "supported (adamw here is decoupled weight decay with bias correction)")
        name = "adamw"
        params = {k: v for k, v in params.items() if k not in _IMPLEMENTATION_PARAMS}
    elif kind in OPTIMIZERS:
        name = kind
    else:
        raise DeepSpeedJSONError(f'{path}: optimizer type {given!r} is not supported; use {supported}, '
                                 'or remove the "optimizer" section and set optimizer.name')
    allowed = set(optimizer_hparams(name))
    unknown = sorted(k for k in params if k != "lr" and k not in allowed)
    if unknown:
        raise DeepSpeedJSONError(f"{path}: optimizer {given} params {', '.join(unknown)} are not hyperparameters of "
                                 f"{name} (it takes {', '.join(sorted(allowed)) or 'none'})")
    out: dict = {"name": name, "hparams": {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in params.items() if k != "lr"}}
    if "lr" in params:
        out["lr"] = params["lr"]
    return out


def apply_deepspeed_json(tree: dict, overridden: set[str]) -> None:
    """Fold the DeepSpeed JSON named by ``tree["engine"]["deepspeed_config"]`` into ``tree``'s
    ``optimizer`` section. ``overridden``: the dotted keys set on the command line, which must
    agree with the JSON rather than silently win or lose."""
    engine = tree.get("engine")
    path = engine.get("deepspeed_config") if isinstance(engine, dict) else None
    if not path:
        return
    ds = read_deepspeed_json(str(path))
    if ds is None:
        return
    if "scheduler" in ds:
        kind = ds["scheduler"].get("type") if isinstance(ds["scheduler"], dict) else None
        raise DeepSpeedJSONError(f'{path}: a "scheduler" section ({kind or "no type"}) is not used here; remove it '
                                 "and set schedule.warmup_steps, schedule.decay (cosine, linear, constant) and "
                                 "schedule.min_lr_ratio (the run decays over train.steps)")
    if "optimizer" not in ds:
        return
    chosen = optimizer_from_json(ds["optimizer"], str(path))
    opt = tree.get("optimizer")
    if not isinstance(opt, dict):
        opt = tree["optimizer"] = {}
    wanted = {"optimizer.name": chosen["name"], **({"optimizer.lr": chosen["lr"]} if "lr" in chosen else {}),
              **{f"optimizer.hparams.{k}": v for k, v in chosen["hparams"].items()}}
    for key, value in wanted.items():
        if key in overridden:
            here = _get_dotted(tree, key)
            if str(here).lower() != str(value).lower() and _as_number(here) != _as_number(value):
                raise DeepSpeedJSONError(f'{key}={here} on the command line disagrees with {path}\'s "optimizer" '
                                         f"section ({key.split('.')[-1]} {value}); change one of them")
    if opt.get("name") != chosen["name"]:
        # the YAML's hparams belong to the optimizer it named, not to this one
        hp = opt.get("hparams") if isinstance(opt.get("hparams"), dict) else {}
        opt["hparams"] = {k: v for k, v in hp.items() if f"optimizer.hparams.{k}" in overridden}
    opt["name"] = chosen["name"]
    if "lr" in chosen:
        opt["lr"] = chosen["lr"]
    opt.setdefault("hparams", {}).update(chosen["hparams"])


def _get_dotted(tree: dict, key: str):
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _as_number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
