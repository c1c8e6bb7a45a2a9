"""Typed configuration tree: defaults < YAML file (with ``base:`` inheritance) < CLI ``a.b=value`` overrides.

Every field is checked against its annotated type and range; an error names the field (``optim.lr``), the value
and what would be valid. The resolved tree is written into the run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the field."""


@dataclass
class ModelConfig:
    arch: str = "gpt_neox"  # "gpt_neox" (Pythia) or "llama"
    vocab_size: int = 50304
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int | None = None  # llama only; None = num_heads (MHA)
    intermediate_size: int = 2048
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25  # gpt_neox: fraction of each head rotated (llama: always 1.0)
    rope_theta: float = 10000.0
    parallel_residual: bool = True  # gpt_neox
    tie_embeddings: bool = False
    init_std: float = 0.02
    pretrained: str | None = None  # HF hub id or local HF directory to start from (continue-training runs)
    revision: str | None = None  # hub revision of ``pretrained`` (e.g. "step143000")
    compile: bool = False  # torch.compile the model

    def validate(self) -> None:
        _choice("model.arch", self.arch, ("gpt_neox", "llama"))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):  # fmt: skip
            _positive(f"model.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not a multiple of model.num_heads")
        if self.num_kv_heads is not None:
            if self.arch != "llama":
                raise ConfigError(f"model.num_kv_heads is used by arch=llama only (arch={self.arch}); set it to null")
            if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
                raise ConfigError(
                    f"model.num_kv_heads must be a positive divisor of model.num_heads={self.num_heads} "
                    f"(or null for num_heads), got {self.num_kv_heads}"
                )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"model.rotary_pct must be in (0, 1], got {self.rotary_pct}")
        _positive("model.rope_theta", self.rope_theta)
        _positive("model.init_std", self.init_std)


@dataclass
class DataConfig:
    # "hf" (datasets hub), "local" (text/parquet files), "tokens" (pre-tokenized uint16 .bin files, see
    # train/pretokenize.py), "synthetic" (generated)
    source: str = "synthetic"
    hf_path: str = "Salesforce/wikitext"
    hf_name: str = "wikitext-103-raw-v1"
    train_files: list[str] = field(default_factory=list)  # local: .txt/.raw/.tokens/.parquet; tokens: .bin
    valid_files: list[str] = field(default_factory=list)  # local: empty = hold out the tail of the training tokens
    tokenizer: str = "EleutherAI/pythia-70m"  # a hub id, or a path to tokenizer.json
    seq_len: int = 512
    batch_size: int = 24  # global sequences per optimizer step (split across data-parallel ranks)
    windows: str = "chunks"  # "chunks": non-overlapping contiguous; "random": random start per sequence
    valid_fraction: float = 0.005  # held-out tail when there is no validation split
    max_train_tokens: int | None = None  # cap on the training tokens used (None = all)
    cache_dir: str = ".cache/tokens"
    synthetic_vocab: int = 256
    synthetic_tokens: int = 400_000
    synthetic_seed: int = 1234

    def validate(self) -> None:
        _choice("data.source", self.source, ("hf", "local", "tokens", "synthetic"))
        _choice("data.windows", self.windows, ("chunks", "random"))
        _positive("data.seq_len", self.seq_len)
        _positive("data.batch_size", self.batch_size)
        if self.source in ("local", "tokens") and not self.train_files:
            raise ConfigError(
                f"data.source={self.source} needs data.train_files (e.g. data.train_files=[corpus/*.txt])"
            )
        if not 0.0 < self.valid_fraction < 0.5:
            raise ConfigError(f"data.valid_fraction must be in (0, 0.5), got {self.valid_fraction}")
        if self.synthetic_vocab < 4 or self.synthetic_vocab > 65535:
            raise ConfigError(f"data.synthetic_vocab must be in [4, 65535], got {self.synthetic_vocab}")
        _positive("data.synthetic_tokens", self.synthetic_tokens)
        if self.max_train_tokens is not None and self.max_train_tokens < self.seq_len + 1:
            raise ConfigError(
                f"data.max_train_tokens must be null (all) or at least one sequence, data.seq_len + 1 = "
                f"{self.seq_len + 1}, got {self.max_train_tokens}"
            )
        if not self.cache_dir:
            raise ConfigError("data.cache_dir must be a directory path, got an empty string")


@dataclass
class OptimConfig:
    # "adamw", or "muon": Muon for the hidden 2-D matrices (attention and MLP weights), AdamW for embeddings, head,
    # norms and biases (the usual hybrid split; instrumented_adamw.hybrid_param_groups)
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01  # on every parameter (the papers' recipe)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay_schedule: str = "lr"  # "lr" (torch) or "lr_squared" (decay ∝ η², Chou 2025)
    grad_clip: float | None = None  # None = no clipping (the papers' recipe)
    fused: bool | None = None  # None: torch's default choice of implementation
    track_every: int = 1
    # name=muon: Muon's settings (its groups follow the same schedule and lr_squared choice, scaled to muon_lr)
    muon_lr: float | None = None  # None: lr (with adjust_lr_fn=match_rms_adamw, AdamW's lr carries over)
    muon_weight_decay: float | None = None  # None: weight_decay
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr_fn: str = "match_rms_adamw"  # or "original" (Keller Jordan's sqrt(max(1, A/B)))

    def validate(self) -> None:
        _choice("optim.name", self.name, ("adamw", "muon"))
        _positive("optim.lr", self.lr)
        if self.muon_lr is not None:
            _positive("optim.muon_lr", self.muon_lr)
        if self.muon_weight_decay is not None and self.muon_weight_decay < 0:
            raise ConfigError(f"optim.muon_weight_decay must be >= 0, got {self.muon_weight_decay}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"optim.muon_momentum must lie in [0, 1), got {self.muon_momentum}")
        if not 1 <= self.muon_ns_steps < 100:
            raise ConfigError(f"optim.muon_ns_steps must be in [1, 100), got {self.muon_ns_steps}")
        _choice("optim.muon_adjust_lr_fn", self.muon_adjust_lr_fn, ("original", "match_rms_adamw"))
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {self.betas}")
        _positive("optim.eps", self.eps)
        _choice("optim.weight_decay_schedule", self.weight_decay_schedule, ("lr", "lr_squared"))
        if self.grad_clip is not None:
            _positive("optim.grad_clip", self.grad_clip)
        _positive("optim.track_every", self.track_every)


@dataclass
class ScheduleConfig:
    total_steps: int = 20_000
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    kind: str = "cosine"  # "cosine" or "constant" (after warmup)
    # Stop after this step, on the schedule of total_steps: the first steps of a long recipe (the CPU study's golden
    # test), or a run cut to a time window; a later launch with a larger stop_at (or none) resumes it. None: total.
    stop_at: int | None = None

    def validate(self) -> None:
        _positive("schedule.total_steps", self.total_steps)
        if self.stop_at is not None and not 0 < self.stop_at <= self.total_steps:
            raise ConfigError(f"schedule.stop_at must be in [1, total_steps={self.total_steps}], got {self.stop_at}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ConfigError(f"schedule.warmup_steps must be in [0, total_steps), got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _choice("schedule.kind", self.kind, ("cosine", "constant"))


@dataclass
class LoggingConfig:
    log_every: int = 10  # read the forces (one host transfer) and write a record
    eval_every: int = 500
    eval_batches: int = 20
    weibull_every: int = 250  # per-block Weibull fits (0 = off)
    per_tensor: bool = True  # per-tensor force records in forces.jsonl
    per_tensor_every: int = 0  # per-tensor entries only every N steps, each integrating since the last (0 = every log)
    progress: bool = True  # tqdm bar
    wandb: bool = False
    wandb_project: str = "instrumented-adamw"
    wandb_mode: str | None = None  # None: wandb's own default (WANDB_MODE); "offline" for no network
    tensorboard: bool = False
    report: bool = True  # figures + report.html into run_dir/report at the end of the run

    def validate(self) -> None:
        _positive("logging.log_every", self.log_every)
        _positive("logging.eval_every", self.eval_every)
        _positive("logging.eval_batches", self.eval_batches)
        if self.weibull_every < 0:
            raise ConfigError(f"logging.weibull_every must be >= 0, got {self.weibull_every}")
        if self.per_tensor_every < 0:
            raise ConfigError(f"logging.per_tensor_every must be >= 0 (0: every log step), got {self.per_tensor_every}")
        if self.wandb_mode is not None:
            _choice("logging.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))


@dataclass
class CheckpointConfig:
    every: int = 250  # weights (safetensors + HF config.json) every N steps, plus step 0
    early: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])  # log-spaced early steps
    save_optimizer: bool = False  # also keep the Adam moments with every numbered checkpoint
    resume_every: int = 250  # the overwritten resume state (weights + optimizer + position)

    def validate(self) -> None:
        _positive("checkpoint.every", self.every)
        _positive("checkpoint.resume_every", self.resume_every)
        if any(s <= 0 for s in self.early):
            raise ConfigError(f"checkpoint.early steps must be positive, got {self.early}")


@dataclass
class DistributedConfig:
    strategy: str = "none"  # "none", "ddp" or "fsdp" (FSDP2 fully_shard per block); launch with torchrun
    backend: str | None = None  # None: nccl on CUDA, gloo on CPU

    def validate(self) -> None:
        _choice("distributed.strategy", self.strategy, ("none", "ddp", "fsdp"))


#: ``run.device`` values: ``auto`` (this process's GPU if there is one, else the CPU), ``cpu``, ``cuda`` (this
#: process's GPU: ``cuda:LOCAL_RANK``), ``cuda:N``, ``mps`` (Apple GPUs).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 1
    out_dir: str = "runs"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    resume: bool = True  # continue from run_dir/resume if it exists
    overwrite: bool = False  # discard what the run directory holds and start over (once: not in a rerun command)
    allow_config_change: bool = False  # resume although the config differs from the run's (recorded with the step)
    accept_damaged_logs: bool = False  # resume although a log differs from what its resume state recorded
    max_nonfinite_steps: int = 10  # stop after this many steps in a row with a non-finite loss

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        if not self.out_dir:
            raise ConfigError("run.out_dir must be a directory path, got an empty string")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"run.seed must be in [0, 2**63), got {self.seed}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"run.device must be one of auto, cpu, cuda, cuda:N, mps; got {self.device!r}")
        _positive("run.max_nonfinite_steps", self.max_nonfinite_steps)


#: Fields that may differ between the launches of one run without changing what it computes: how it is launched,
#: watched and where its caches are. Any other difference on resume is refused unless run.allow_config_change.
RESUME_FREE_FIELDS = frozenset(
    {"run.name", "run.out_dir", "run.device", "run.resume", "run.overwrite", "run.allow_config_change",
     "run.accept_damaged_logs", "run.max_nonfinite_steps", "logging.progress", "logging.report", "logging.wandb",
     "logging.wandb_project", "logging.wandb_mode", "logging.tensorboard", "data.cache_dir", "distributed.backend",
     "schedule.stop_at"}
)  # fmt: skip


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.optim.name == "muon" and self.distributed.strategy == "fsdp":
            raise ConfigError(
                "optim.name=muon with distributed.strategy=fsdp: Muon orthogonalises whole matrices and FSDP2 "
                "shards them; use distributed.strategy=ddp (or none) for Muon runs"
            )
        if self.checkpoint.resume_every % self.logging.log_every:
            raise ConfigError(
                f"checkpoint.resume_every={self.checkpoint.resume_every} must be a multiple of "
                f"logging.log_every={self.logging.log_every} (a resume point starts a fresh force interval)"
            )
        for name, every in (
            ("logging.weibull_every", self.logging.weibull_every),
            ("checkpoint.every", self.checkpoint.every),
        ):
            if every % self.logging.log_every:
                raise ConfigError(
                    f"{name}={every} must be a multiple of logging.log_every={self.logging.log_every} (the analyses "
                    "pair fits and checkpoints with the force records of the same step)"
                )
        every = self.logging.per_tensor_every
        if every and self.logging.per_tensor:
            if every % self.logging.log_every:
                raise ConfigError(
                    f"logging.per_tensor_every={every} must be a multiple of logging.log_every={self.logging.log_every}"
                )
            for name, value in (("logging.weibull_every", self.logging.weibull_every),
                                ("checkpoint.every", self.checkpoint.every)):  # fmt: skip
                if value % every:
                    raise ConfigError(
                        f"{name}={value} must be a multiple of logging.per_tensor_every={every} (the closed loop and "
                        "spline recovery need per-tensor records at every fit and checkpoint step)"
                    )
        if self.data.source == "synthetic" and self.model.vocab_size < self.data.synthetic_vocab:
            raise ConfigError(
                f"model.vocab_size={self.model.vocab_size} < data.synthetic_vocab={self.data.synthetic_vocab}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (following ``base:`` chains), then ``key.sub=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml_chain(Path(path), seen=())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return _build(Config, tree, "").validate()


def _read_yaml_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path} includes itself through 'base:'")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    data.pop("sweep", None)  # sweep grids are read by train.sweep, not part of a run's config
    if base is None:
        return data
    return _merge(_read_yaml_chain(path.parent / base, seen + (path,)), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls, tree: Any, prefix: str):
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(tree) - names
    if unknown:
        where = prefix or "the top level"
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in tree.items():
        path = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, path)
        else:
            kwargs[name] = _coerce(value, hint, path)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if origin is tuple:
            if len(args) == 2 and args[1] is not Ellipsis and len(value) != len(args):
                raise ConfigError(f"{path} needs {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{path} must be an integer, got {value!r}") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"{path} must be a finite integer, got {value!r}")
        if number != int(number):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        try:
            number = float(value)  # YAML reads 3e-3 as a string: accept it as a number here
        except (TypeError, ValueError):
            raise ConfigError(f"{path} must be a number, got {value!r}") from None
        if not math.isfinite(number):  # no field means anything at inf or nan; null is the "off" value
            raise ConfigError(f"{path} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {hint}")


def _choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path} must be one of {list(allowed)}, got {value!r}")


def _positive(path: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{path} must be > 0, got {value!r}")


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically and durably: a kill never leaves half a config.yaml)."""
    from instrumented_adamw.utils.durable_io import write_durably

    write_durably(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False).encode())


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
