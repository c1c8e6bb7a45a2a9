"""The Weibull framework's diagnostics F1–F8, numbered and named as in the framework paper's Table 6.

==== =====================================================  ================================================
F1   :func:`load_weights`                                  extract weights: module, state dict, file, HF dir
F2   :func:`fit_blocks`, :func:`pooled_fit`                Weibull(k, λ) per matrix (canonical); pooled
F3   :func:`gamma_closure`                                 σ_|w| vs λ√(Γ(1+2/k) − Γ²(1+1/k)); Γ-bridge
F4   :func:`cross_family_band`                             median Transmission k per model, band and CV
F5   :func:`lambda_scaling`                                λ vs √(η/λ_wd): Pearson r, fit through the origin
F6   :func:`k_drift` (Δk = k_terminal − k_init),           k drift per block; against init (the paper's) or
     :func:`k_drift_from_anchor` (k − k₀)                  against the half-normal anchor
F7   :func:`attention_architecture`                        MHA / GQA / MQA from the head counts
F8   :func:`paired_lambda_correlation`                     r of log λ_a vs log λ_b across checkpoints
—    :func:`training_budget`, :func:`physical_state`       T/τ = Σ η_t λ_t and the paper's four states
==== =====================================================  ================================================

npm-weibull-py numbers its functions differently; ``docs/weibull.md`` maps paper ↔ library ↔ these names.
Nothing here runs inside ``step()``: fits synchronise with the host once per matrix.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instrumented_adamw.taxonomy import TRANSMISSION, ParamRole, classify_all, detect_family, family_for_model_type
from instrumented_adamw.utils.extras import require
from instrumented_adamw.weibull.fit import WeibullFit, fit_weibull, fit_weibull_histogram, half_normal_anchor


# ---------------------------------------------------------------------------------------------- F1: extract
@dataclass
class Weights:
    """Named tensors plus what is known of the model: its HF config (``{}`` if none) and where it came from."""

    tensors: dict[str, Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    source: str = "<tensors>"

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def roles(self) -> dict[str, ParamRole]:
        return classify_all(self.tensors, self.model_type)


class HubUnavailableError(RuntimeError):
    """A hub id was given but the Hugging Face hub cannot be reached (or HF_HUB_OFFLINE is set)."""


def load_weights(source: nn.Module | Mapping[str, Tensor] | str | os.PathLike, revision: str | None = None) -> Weights:
    """F1 (extract weights): the named tensors of a live module, a state dict, a ``.safetensors`` / ``.pt`` /
    ``.bin`` file, an HF model directory (``config.json`` + safetensors shards or ``pytorch_model.bin``), or an HF
    hub id (``org/name``, downloaded through ``huggingface_hub``; an unreachable hub raises
    :class:`HubUnavailableError` saying what to do instead)."""
    if isinstance(source, nn.Module):
        config = source.config.to_dict() if hasattr(source, "config") and hasattr(source.config, "to_dict") else {}
        tensors = {n: p.detach() for n, p in source.named_parameters()}
        return Weights(tensors, config, f"<{type(source).__name__}>")
    if isinstance(source, Mapping):
        return Weights({n: t.detach() for n, t in source.items() if isinstance(t, Tensor)}, {}, "<state dict>")
    path = Path(source)
    if path.is_dir():
        return _load_directory(path)
    if path.is_file():
        return Weights(_load_file(path), {}, str(path))
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return _load_directory(_download(text, revision), hub_id=text)
    raise FileNotFoundError(f"{text!r} is neither a file, a directory, nor a hub id of the form 'org/name'")


def _load_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return require("safetensors.torch", f"reading {path.name}").load_file(str(path))
    if path.suffix in (".pt", ".pth", ".bin"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]  # a training checkpoint that nests the state dict
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
        return {n: t for n, t in obj.items() if isinstance(t, Tensor)}
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .safetensors, .pt, .pth or .bin")


def _load_directory(path: Path, hub_id: str | None = None) -> Weights:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))  # never both: duplicates
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(_load_file(f))
    return Weights(tensors, config, hub_id or str(path))


def _download(repo_id: str, revision: str | None) -> Path:
    snapshot_download = require("huggingface_hub", f"downloading {repo_id!r}").snapshot_download
    try:
        # Older revisions (e.g. Pythia's step checkpoints) may hold only pytorch_model.bin.
        local = snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as exc:  # the hub raises several types (offline mode, connection, 404): all mean "not here"
        raise HubUnavailableError(
            f"could not fetch {repo_id!r} (revision {revision or 'main'}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. On a machine with network, run "
            f"`hf download {repo_id} --local-dir DIR` (or save_pretrained to DIR) and pass DIR instead."
        ) from exc
    return Path(local)


# ---------------------------------------------------------------------------------------------- F2: fit
#: F2 fit methods: the exact sort-based fit (canonical), or the histogram variant the papers' database used.
FIT_METHODS = ("exact", "histogram")


@dataclass(frozen=True)
class BlockFit:
    """A fit of one weight matrix (``pooled=False``) or of several pooled together (``name`` says which)."""

    name: str
    layer: int | None
    component: str | None
    cls: str
    shape: tuple[int, ...]
    fit: WeibullFit
    pooled: bool = False
    method: str = "exact"  # one of FIT_METHODS

    def to_dict(self) -> dict[str, Any]:
        return dict(
            name=self.name,
            layer=self.layer,
            component=self.component,
            cls=self.cls,
            shape=list(self.shape),
            pooled=self.pooled,
            method=self.method,
            **self.fit.to_dict(),
        )


def fit_blocks(
    source,
    trim: float = 0.1,
    classes: Iterable[str] | None = None,
    include_vectors: bool = False,
    method: str = "exact",
) -> list[BlockFit]:
    """F2 (fit): one mid-(1−2·trim) fit per weight matrix (≥ 2-D; ``include_vectors`` adds biases and norms).

    ``method="exact"`` is :func:`~instrumented_adamw.weibull.fit_weibull` (every element, no binning);
    ``"histogram"`` is :func:`~instrumented_adamw.weibull.fit_weibull_histogram` with its defaults, the papers'
    database pipeline (mean subtracted, 1024 log10 bins, whole bins). Tensors that cannot be fitted (constant,
    all-zero, integer) are skipped with a warning that names them."""
    if method not in FIT_METHODS:
        raise ValueError(f"method must be one of {FIT_METHODS}, got {method!r}")
    fit_one = fit_weibull if method == "exact" else fit_weibull_histogram
    weights = source if isinstance(source, Weights) else load_weights(source)
    wanted = set(classes) if classes is not None else None
    out = []
    for name, role in weights.roles().items():
        t = weights.tensors[name]
        if (t.ndim < 2 and not include_vectors) or (wanted is not None and role.cls not in wanted):
            continue
        try:
            fit = fit_one(t, trim)
        except ValueError as exc:  # integer buffers, all-zero or constant tensors (norms at init)
            warnings.warn(f"fit_blocks: skipped {name}: {exc}", stacklevel=2)
            continue
        out.append(BlockFit(name, role.layer, role.component, role.cls, tuple(t.shape), fit, method=method))
    return out


def pooled_fit(source, cls: str = TRANSMISSION, trim: float = 0.1) -> BlockFit:
    """F2, pooled: all matrices of one class in a single exact fit. Labelled ``pooled``: mixing matrices of
    different init scales depresses k (a scale mixture), so per-block fits stay canonical."""
    weights = source if isinstance(source, Weights) else load_weights(source)
    roles = weights.roles().items()
    parts = [weights.tensors[n].reshape(-1) for n, r in roles if r.cls == cls and weights.tensors[n].ndim >= 2]
    if not parts:
        raise ValueError(f"no {cls} matrices in {weights.source}")
    flat = torch.cat([p.float() for p in parts])
    return BlockFit(f"pooled:{cls}", None, None, cls, (flat.numel(),), fit_weibull(flat, trim), pooled=True)


# ---------------------------------------------------------------------------------------------- F3: Γ-closure
def gamma_closure(fit: WeibullFit) -> dict[str, float]:
    """F3 (Γ-closure): how Weibull-like |w| is. ``closure`` = measured σ_|w| / the σ a Weibull(k, λ) would have,
    λ√(Γ(1+2/k) − Γ²(1+1/k)) (1 for a true Weibull); ``bridge`` = Γ-bridge λ / fitted λ (1 for a true Weibull,
    0.8176/0.8875 = 0.921 at the half-normal anchor)."""
    return dict(
        std_abs=fit.std_abs,
        closure_std=fit.gamma_closure_std,
        closure=fit.std_abs / fit.gamma_closure_std,
        lam_over_rms=fit.lam_over_rms,
        bridge_lam_over_rms=fit.gamma_bridge_lam / fit.rms,
        bridge=fit.gamma_bridge_lam / fit.lam,
    )


# ---------------------------------------------------------------------------------------------- F4: band
@dataclass(frozen=True)
class Band:
    medians: dict[str, float]  # entry → median k of its blocks
    low: float
    high: float
    cv: float  # std/mean of the medians (population std)


def cross_family_band(entries: Mapping[str, Sequence[BlockFit]], cls: str = TRANSMISSION) -> Band:
    """F4 (cross-family band): median k of each entry's ``cls`` blocks (per-block fits only), and the band they
    span (paper: Transmission [1.186, 1.204] over 12 models)."""
    medians = {}
    for entry, fits in entries.items():
        ks = [b.fit.k for b in fits if b.cls == cls and not b.pooled]
        if not ks:
            raise ValueError(f"entry {entry!r} has no per-block {cls} fits")
        medians[entry] = float(np.median(ks))
    values = np.array(list(medians.values()))
    return Band(medians, float(values.min()), float(values.max()), float(values.std() / values.mean()))


# ---------------------------------------------------------------------------------------------- F5: λ scaling
@dataclass(frozen=True)
class Scaling:
    pearson_r: float  # λ against √(η/λ_wd)
    slope: float  # c in λ ≈ c·√(η/λ_wd), least squares through the origin
    r2_origin: float  # 1 − Σ(λ − c·s)² / Σλ² (uncentred, as for a fit through the origin)
    n: int


def lambda_scaling(lams: Sequence[float], lrs: Sequence[float], weight_decays: Sequence[float]) -> Scaling:
    """F5 (λ scaling): does terminal λ scale as √(η/λ_wd)? (Pythia: λ ≈ 0.087·√(η/λ_wd), r = 0.94.)"""
    lam, eta, wd = (np.asarray(v, dtype=np.float64) for v in (lams, lrs, weight_decays))
    if not (lam.shape == eta.shape == wd.shape) or lam.size < 2:
        raise ValueError(f"need ≥ 2 runs with matching lengths, got {lam.size} λ, {eta.size} η, {wd.size} λ_wd")
    if np.any(eta <= 0) or np.any(wd <= 0):
        raise ValueError("learning rates and weight decays must be positive")
    s = np.sqrt(eta / wd)
    c = float((lam * s).sum() / (s * s).sum())
    r2 = 1.0 - float(((lam - c * s) ** 2).sum() / (lam * lam).sum())
    return Scaling(float(np.corrcoef(lam, s)[0, 1]), c, r2, int(lam.size))


# ---------------------------------------------------------------------------------------------- F6: k drift
@dataclass(frozen=True)
class Drift:
    """k drift of each block. ``reference`` says against what: ``"init"`` (Δk = k_terminal − k_init, the paper's
    F6) or ``"anchor"`` (k − k₀, the half-normal anchor of the same trim, stored in ``anchor``)."""

    reference: str
    per_block: dict[str, float]  # name → drift
    median: float
    max_abs: float
    anchor: float | None = None


def _per_block_k(fits: Sequence[BlockFit], cls: str | None) -> dict[str, float]:
    return {b.name: b.fit.k for b in fits if (cls is None or b.cls == cls) and not b.pooled}


def _drift(reference: str, per: dict[str, float], anchor: float | None = None) -> Drift:
    d = np.array(list(per.values()))
    return Drift(reference, per, float(np.median(d)), float(np.abs(d).max()), anchor)


def k_drift(initial: Sequence[BlockFit], terminal: Sequence[BlockFit], cls: str | None = TRANSMISSION) -> Drift:
    """F6 (k drift), as the paper defines it: Δk = k_terminal − k_init of each block, matched by name.

    ``initial`` and ``terminal`` are per-block fits (:func:`fit_blocks`) of two checkpoints of the same model,
    e.g. step 0 and the last step; ``cls=None`` takes every class. A block present in only one of them is an
    error (named), not silently dropped."""
    k0, k1 = _per_block_k(initial, cls), _per_block_k(terminal, cls)
    if not k1:
        raise ValueError(f"no per-block fits of class {cls} in the terminal checkpoint")
    if k0.keys() != k1.keys():
        only_init, only_term = sorted(k0.keys() - k1.keys()), sorted(k1.keys() - k0.keys())
        raise ValueError(
            f"the checkpoints do not have the same {cls} blocks: only in initial {only_init}, only in terminal "
            f"{only_term}; fit both with the same classes and naming"
        )
    return _drift("init", {name: k1[name] - k0[name] for name in k1})


def k_drift_from_anchor(fits: Sequence[BlockFit], trim: float = 0.1, cls: str | None = TRANSMISSION) -> Drift:
    """F6 against the half-normal anchor: k − k₀ of each block, k₀ the anchor of the same protocol (1.2054343
    for mid-80). Equals the paper's Δk when the initial matrices are Gaussian and large, and needs only one
    checkpoint. (npm-weibull-py uses a hard-coded 1.205 here.)"""
    anchor, _ = half_normal_anchor(trim)
    per = {name: k - anchor for name, k in _per_block_k(fits, cls).items()}
    if not per:
        raise ValueError(f"no per-block fits of class {cls}")
    return _drift("anchor", per, anchor)


# ---------------------------------------------------------------------------------------------- F7: attention
def attention_architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """F7 (attention-architecture classify): MHA (one KV head per query head), MQA (one KV head shared by
    several query heads), GQA (in between) from an HF config. A single-head model is MHA (nothing is shared;
    npm-weibull-py calls it MQA)."""
    heads = config.get("num_attention_heads", config.get("n_head"))
    if heads is None:
        raise ValueError("config has no num_attention_heads (or n_head); cannot tell the attention architecture")
    kv = config.get("num_key_value_heads") or heads
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    kind = "MHA" if kv == heads else "MQA" if kv == 1 else "GQA"
    return dict(kind=kind, num_attention_heads=heads, num_key_value_heads=kv, group_size=heads // kv)


# ---------------------------------------------------------------------------------------------- F8: paired λ
def paired_lambda_correlation(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """F8 (paired λ correlation): Pearson r of log λ_a and log λ_b over the same checkpoints, as the paper
    computes it (r = 0.9967 for λ_O vs λ_FFN_out), and the slope of log λ_b on log λ_a.

    Log–log because λ trajectories grow multiplicatively: two components whose scales keep a power-law relation
    λ_b = c·λ_a^p have r = 1 whatever p, which a linear r does not show. ``r_linear`` (Pearson r of the raw λ)
    is reported alongside for comparison only."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 3:
        raise ValueError(f"need two 1-D trajectories of equal length ≥ 3, got shapes {x.shape} and {y.shape}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("λ values must be positive")
    lx, ly = np.log(x), np.log(y)
    if np.ptp(lx) == 0 or np.ptp(ly) == 0:
        raise ValueError("a constant λ trajectory has no correlation")
    slope = float(np.polyfit(lx, ly, 1)[0])
    return dict(
        r=float(np.corrcoef(lx, ly)[0, 1]), log_slope=slope, r_linear=float(np.corrcoef(x, y)[0, 1]), n=int(x.size)
    )


# ---------------------------------------------------------------------------------------------- T/τ
#: The paper's physical states by T/τ (lower bounds, highest first). τ = 1/(η·λ_wd) is the e-folding time of
#: AdamW's decoupled decay W ← (1 − ηλ_wd)·W, so after T/τ = Σ η_t λ_t the part of W inherited from the
#: initialisation is scaled by e^(−T/τ):
#:   Saturated       T/τ ≥ 1      at least one time constant (≤ 1/e of the init left); npm-weibull-py's bound
#:   Near-saturated  T/τ ≥ ln 2   at least one half-life (the init's share halved)
#:   Approaching     T/τ ≥ 0.2    npm-weibull-py's lower bound of "approaching"
#:   Transition      T/τ < 0.2    decay has barely acted: terminal statistics are budget-limited, not equilibria
#: The paper's examples fall one in each: Pythia-70M 1.43, 160M 0.86, 410M/1B 0.43, 6.9B 0.17.
PHYSICAL_STATES = ((1.0, "Saturated"), (math.log(2.0), "Near-saturated"), (0.2, "Approaching"), (0.0, "Transition"))


def physical_state(t_over_tau: float) -> str:
    """The paper's physical-state label of a training budget T/τ (see :data:`PHYSICAL_STATES`)."""
    if not t_over_tau >= 0:
        raise ValueError(f"T/τ must be a non-negative number, got {t_over_tau}")
    return next(label for bound, label in PHYSICAL_STATES if t_over_tau >= bound)


def training_budget(lr: float | Sequence[float], weight_decay: float | Sequence[float], steps: int | None = None):
    """T/τ = Σ_t η_t λ_t (constant η, λ: T·η·λ) and its physical state (:func:`physical_state`).

    The paper quotes T·η_peak·λ_wd (Pythia-70M: 143,000 · 1e-3 · 0.01 = 1.43, Saturated); a schedule passed as
    per-step values gives the budget actually applied, which is smaller under warmup and decay."""
    if np.ndim(lr) == 0 and np.ndim(weight_decay) == 0:
        if steps is None:
            raise ValueError("constant lr and weight_decay need steps")
        t_over_tau = float(steps) * float(lr) * float(weight_decay)
    else:
        lrs = np.asarray(lr, dtype=np.float64)
        wds = np.broadcast_to(np.asarray(weight_decay, dtype=np.float64), lrs.shape)
        t_over_tau = float((lrs * wds).sum())
    return dict(t_over_tau=t_over_tau, label=physical_state(t_over_tau))


def family_of(weights: Weights) -> str | None:
    """The naming family used for ``weights`` (from the config's model_type, else detected)."""
    if weights.model_type is not None:
        return family_for_model_type(weights.model_type)
    return detect_family(weights.tensors)
