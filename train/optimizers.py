"""The optimizer of a run, from ``optim.*``: InstrumentedAdamW on every parameter (the papers' recipe), or the
hybrid split — InstrumentedMuon for the hidden 2-D matrices, InstrumentedAdamW for the rest — stepped as one."""

from __future__ import annotations

from instrumented_adamw import HybridOptimizer, InstrumentedAdamW, InstrumentedMuon, hybrid_param_groups
from train.config import OptimConfig


def build_optimizer(cfg: OptimConfig, model) -> InstrumentedAdamW | HybridOptimizer:
    """Every group's ``initial_lr`` is its peak lr: the schedule scales each group from it (``group_peaks``), and
    ``lr_squared`` decay scales by lr_t / peak."""
    adamw_kw = dict(
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,  # on every AdamW parameter, as in the papers' recipe
        fused=cfg.fused,
        track_every=cfg.track_every,
        weight_decay_schedule=cfg.weight_decay_schedule,
    )
    if cfg.name == "adamw":
        opt = InstrumentedAdamW(model.named_parameters(), lr=cfg.lr, **adamw_kw)
    else:
        muon_params, adamw_params = hybrid_param_groups(model)
        muon = InstrumentedMuon(
            muon_params,
            lr=cfg.muon_lr if cfg.muon_lr is not None else cfg.lr,
            weight_decay=cfg.muon_weight_decay if cfg.muon_weight_decay is not None else cfg.weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps,
            adjust_lr_fn=cfg.muon_adjust_lr_fn,
            track_every=cfg.track_every,
            weight_decay_schedule=cfg.weight_decay_schedule,
        )
        opt = HybridOptimizer([muon, InstrumentedAdamW(adamw_params, lr=cfg.lr, **adamw_kw)])
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def group_peaks(opt) -> list[float]:
    """Each group's peak lr (``initial_lr``), in ``param_groups`` order: the schedule multiplies it."""
    return [float(g["initial_lr"]) for g in opt.param_groups]
