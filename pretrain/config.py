"""Run configs: YAML files checked into typed objects before any work starts.

    cfg = load_run_config("configs/gpt_demo.yaml", ["optimizer.lr=3e-4", "train.steps=100"])

An unknown key, a wrong type, a bad value or a missing file raises ``ConfigError`` with one line
that names the key (and the close matches for a typo). Dotted overrides use YAML syntax for the
value, so ``train.steps=100`` is an int and ``optimizer.hparams={weight_decay: 0.1}`` a mapping.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(UserError, ValueError):
    """A run config that cannot be used; the message is one line saying what to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    kind: Literal["gpt", "bert"] = "gpt"
    preset: str = "demo"
    # Any field of pretrain.models.GPTConfig / BertConfig, e.g. {num_layers: 4, hidden_dropout: 0.0}.
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Start from these weights (a checkpoint of any engine, or a local HF GPT-2 directory) with a
    # fresh optimizer; ignored when resuming from this run's own checkpoint.
    init_from: str | None = None


class DataSection(_Section):
    # Megatron-style blend: ["prefix"] or ["0.7", "prefix_a", "0.3", "prefix_b"]. Empty = the
    # bundled corpus (prepared on first use under cache_dir).
    blend: list[str] = Field(default_factory=list)
    # A sentencepiece .model, or (GPT-2 BPE / Hugging Face) a tokenizer directory or a vocab.json
    # with merges.txt beside it: pretrain.data.tokenizer.load_tokenizer.
    tokenizer: str = "data/tokenizer/spm_bpe_8k.model"
    split: str = "98,1,1"
    # Seed of the validation/test sample order. None: train.seed. Set it to compare runs of
    # different train.seed on the same validation samples (the evaluator reads the first
    # train.eval_iters batches, so with another order it would score another subset).
    eval_seed: int | None = None
    cache_dir: str = "data/cache"
    num_workers: int = Field(0, ge=0)

    @field_validator("split", mode="before")
    @classmethod
    def _split_number(cls, v):
        # YAML reads data.split=100 as a number: a single-weight split.
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("split")
    @classmethod
    def _megatron_split(cls, v: str) -> str:
        # megatron-core takes every run of digits and dots as a weight and normalizes by the sum,
        # so anything else would silently become NaN ratios or a different split.
        parts = re.split(r"[,/]", v)
        if not (1 <= len(parts) <= 3 and all(re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*", p) for p in parts)):
            raise ValueError(f"{v!r} is not 1 to 3 non-negative train,valid,test weights (e.g. '98,1,1' or '98/1/1')")
        if sum(float(p) for p in parts) <= 0:
            raise ValueError(f"{v!r}: the weights must not all be 0")
        return v


class OptimizerSection(_Section):
    name: str = "adalomo"
    lr: float = Field(1e-3, gt=0)
    # Any other hyperparameter of the optimizer (checked by memopt.create_optimizer's list).
    hparams: dict[str, Any] = Field(default_factory=dict)
    # "auto": fused backward for optimizers that have it (lomo, adalomo) unless gradient
    # accumulation is on, where it falls back to ordinary steps (the update would otherwise
    # happen on every micro-batch).
    fused_backward: Literal["auto", "on", "off"] = "auto"

    @field_validator("fused_backward", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        # YAML 1.1 reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        from memopt.registry import optimizer_class

        optimizer_class(v)  # raises ValueError naming the choices
        return v.lower()

    @model_validator(mode="after")
    def _known_hparams(self):
        from memopt.registry import optimizer_hparams

        valid = set(optimizer_hparams(self.name))
        for key in self.hparams:
            if key == "lr":
                raise ValueError("set the learning rate as optimizer.lr, not optimizer.hparams.lr")
            if key not in valid:
                close = difflib.get_close_matches(key, sorted(valid), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown hyperparameter {key!r} for {self.name}{hint}; valid: {', '.join(sorted(valid))}")
        return self


class ScheduleSection(_Section):
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class TrainSection(_Section):
    steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    seq_length: int | None = Field(None, ge=8)  # default: the model preset's
    clip_grad_norm: float | None = Field(1.0, gt=0)
    # bf16: bf16 compute over fp32 masters (every engine); bf16_pure: bf16 weights, lomo/adalomo
    # only (pretrain/train/precision.py says what each engine does).
    precision: Literal["fp32", "bf16", "bf16_pure"] = "fp32"
    seed: int = 1234
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=0)  # 0 = never
    eval_iters: int = Field(4, ge=1)
    max_nonfinite_in_a_row: int = Field(5, ge=1)
    progress_bar: bool = True


class CheckpointSection(_Section):
    dir: str | None = None  # default: <output_dir>/checkpoints
    every: int = Field(0, ge=0)  # 0 = only the final checkpoint
    keep_last: int = Field(2, ge=1)
    resume: str = "auto"  # "auto" (latest in dir if any), "none", or a checkpoint path
    save_final: bool = True


class EngineSection(_Section):
    # "auto": deepspeed when launched by the deepspeed launcher, ddp under torchrun with more
    # than one process, else single.
    kind: Literal["auto", "single", "ddp", "fsdp2", "deepspeed"] = "auto"
    zero_stage: int = Field(2, ge=0, le=3)
    # A DeepSpeed JSON file; when set it is used as is (batch sizes are checked against train.*).
    deepspeed_config: str | None = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class ParallelSection(_Section):
    # Megatron tensor parallelism: each layer's matrices are split over this many consecutive
    # ranks; the data-parallel size is the world size / tensor_parallel_size.
    tensor_parallel_size: int = Field(1, ge=1)


class LoggingSection(_Section):
    """Trackers and the logged step norms (metrics.jsonl and TensorBoard always, W&B on request)."""

    # Weights & Biases (an optional dependency: pip install wandb), rank 0 only.
    wandb: bool = False
    wandb_project: str = "memopt-pretrain"
    wandb_run_name: str | None = None  # default: W&B's own name
    # offline: no network, the run directory under <output_dir>/wandb (sync later with `wandb sync`).
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    # grad_norm and update_norm on logging steps (update_norm copies this rank's weights, or
    # with fused backward one parameter at a time, for the length of a logging step).
    norms: bool = True

    @model_validator(mode="after")
    def _wandb_installed(self):
        import importlib.util

        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb=true needs the wandb package: pip install wandb (or pip install -e '.[wandb]')")
        return self


class RunConfig(_Section):
    output_dir: str = "runs/default"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / "checkpoints"


def _fields_at(path: tuple) -> list[str]:
    """Field names valid at a dotted location (for close-match hints)."""
    model: Any = RunConfig
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = tuple(x for x in e["loc"] if isinstance(x, str))
    key = ".".join(loc) or "<root>"
    if e["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=2)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        return f"unknown config key {key!r}{hint}; valid keys here: {', '.join(valid)}"
    msg = e["msg"].removeprefix("Value error, ")
    if "input" in e and e["type"] != "value_error" and not isinstance(e["input"], dict):
        return f"config key {key!r}: {msg} (got {e['input']!r})"
    return f"config key {key!r}: {msg}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_run_config(path: str | None, overrides: list[str] | None = None, kind: str | None = None) -> RunConfig:
    """``kind`` (from a launcher that trains one model family) is the default of ``model.kind``
    and must agree with it."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            # A run's own config.json is read as JSON: YAML 1.1 would read 1e-05 as a string.
            tree = (json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())) or {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON at line {e.lineno}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        _set_dotted(tree, key, value)
    from pretrain.deepspeed_json import DeepSpeedJSONError, apply_deepspeed_json

    try:
        # before validation, so the JSON's optimizer is checked like one written in the YAML
        apply_deepspeed_json(tree, {key for key, _ in parsed})
    except DeepSpeedJSONError as e:
        raise ConfigError(f"config key 'engine.deepspeed_config': {e}") from None
    if kind is not None and isinstance(tree.get("model", {}), dict):
        tree.setdefault("model", {}).setdefault("kind", kind)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    if kind is not None and cfg.model.kind != kind:
        raise ConfigError(f"config key 'model.kind': {cfg.model.kind!r}, but this launcher trains {kind} models "
                          f"(use launch/pretrain_{cfg.model.kind}.py, or set model.kind={kind})")
    _check_files(cfg)
    _check_precision(cfg)
    _check_model(cfg)
    return cfg


def _check_model(cfg: RunConfig) -> None:
    # Last: it imports the model package (megatron), which the checks above do not need.
    from pretrain.models.config import PRESETS, ConfigFieldError, check_overrides, get_preset

    m = cfg.model
    if m.preset not in PRESETS[m.kind]:
        close = difflib.get_close_matches(m.preset, sorted(PRESETS[m.kind]), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config key 'model.preset': unknown {m.kind} preset {m.preset!r}{hint}; "
                          f"choose from {', '.join(sorted(PRESETS[m.kind]))}")
    try:
        m.overrides = check_overrides(m.kind, m.overrides)
    except ConfigFieldError as e:
        raise ConfigError(f"config key 'model.overrides.{e.field}': {e}") from None
    # The architecture's own checks (divisible heads, positive sizes, a known attention backend),
    # as the trainer will build it; the tokenizer's vocabulary size does not take part in them.
    overrides = dict(m.overrides)
    if cfg.train.seq_length:
        overrides["seq_length"] = cfg.train.seq_length
    try:
        arch = get_preset(m.preset, m.kind, **overrides)
    except ValueError as e:
        raise ConfigError(f"config key 'model.overrides': {e}") from None
    from pretrain.models.config import check_tensor_parallel

    try:  # the vocabulary is the tokenizer's: the trainer checks it again with it
        check_tensor_parallel(arch, cfg.parallel.tensor_parallel_size, check_vocab=False)
    except ValueError as e:
        raise ConfigError(f"config key 'parallel.tensor_parallel_size': {e}") from None


PURE_BF16_OPTIMIZERS = ("lomo", "adalomo")


def precision_problem(precision: str, optimizer: str, engine_kind: str, hparams: dict) -> str | None:
    """Why this train.precision cannot run with this optimizer and engine (one line naming what
    to change), or None. The trainer asks again with the engine that engine.kind=auto chose."""
    if precision == "bf16_pure":
        if optimizer not in PURE_BF16_OPTIMIZERS:
            return (f"bf16_pure (bf16 weights, no fp32 masters) is for {'/'.join(PURE_BF16_OPTIMIZERS)}; with "
                    f"optimizer.name={optimizer} use train.precision=bf16 (bf16 compute, fp32 masters)")
        if engine_kind == "deepspeed":
            return ("bf16_pure does not fit engine.kind=deepspeed, whose bf16 mode keeps fp32 masters anyway: "
                    "use train.precision=bf16, or engine.kind=single/ddp/fsdp2")
    elif hparams.get("stochastic_rounding"):
        return (f"optimizer.hparams.stochastic_rounding rounds updates into bf16 weights, which {precision} does "
                "not have: set train.precision=bf16_pure, or drop stochastic_rounding")
    return None


def _check_precision(cfg: RunConfig) -> None:
    problem = precision_problem(cfg.train.precision, cfg.optimizer.name, cfg.engine.kind, cfg.optimizer.hparams)
    if problem:
        raise ConfigError(f"config key 'train.precision': {problem}")


def _check_files(cfg: RunConfig) -> None:
    if cfg.engine.deepspeed_config and not Path(cfg.engine.deepspeed_config).is_file():
        raise ConfigError(f"config key 'engine.deepspeed_config': file not found: {cfg.engine.deepspeed_config}")
    tok = Path(cfg.data.tokenizer)
    if not tok.exists():
        raise ConfigError(f"config key 'data.tokenizer': file not found: {tok}")
    for item in cfg.data.blend:
        try:
            float(item)
            continue
        except ValueError:
            pass
        if not Path(item + ".idx").is_file() or not Path(item + ".bin").is_file():
            raise ConfigError(f"config key 'data.blend': no Megatron dataset at prefix {item!r} ({item}.bin/.idx)")
    if cfg.model.init_from and not Path(cfg.model.init_from).exists():
        raise ConfigError(f"config key 'model.init_from': not found: {cfg.model.init_from}")
    if cfg.checkpoint.resume not in ("auto", "none") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(f"config key 'checkpoint.resume': checkpoint not found: {cfg.checkpoint.resume}")


def dump_config(cfg: RunConfig) -> str:
    return json.dumps(cfg.model_dump(), indent=1)
