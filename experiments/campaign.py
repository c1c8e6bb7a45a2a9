"""The GPU evidence campaign (``configs/campaign.yaml``) and its bookkeeping against ``results/``.

* :func:`load_campaign` reads and validates the campaign: every run's config resolves (GPU and dry-run variants)
  before anything runs, names are unique folder names, scripts and source files exist.
* :func:`run_overrides` gives a run's full override list (campaign defaults, spline settings, the run's own, and
  in a dry run the demo-size stand-ins); :func:`reproduce_command` the plain ``python -m train`` line that trains
  the same run without the evidence machinery.
* :func:`source_hash` fingerprints the code a check or benchmark measures; :func:`committed_folder` finds whether
  ``results/`` already holds that piece for this device and code; :func:`run_states` says which runs are done,
  pending or stale (committed with another config).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train.config import Config, ConfigError, load_config

#: Folder names in results/ and bundle names: letters, digits, '.', '_', '-' (what the device tool returns).
NAME = re.compile(r"[A-Za-z0-9._-]+")
#: Config sections that decide what a run computes; logging, checkpointing and where it runs do not.
COMPUTE_SECTIONS = ("model", "data", "optim", "schedule")


class CampaignError(ValueError):
    """The campaign file is wrong; the message names the entry."""


@dataclass(frozen=True)
class BenchSpec:
    name: str
    script: str
    args: tuple[str, ...]
    sources: tuple[str, ...]
    estimate_s: float


@dataclass(frozen=True)
class RunSpec:
    name: str
    config: str
    overrides: tuple[str, ...]
    group: str
    why: str
    spline: bool = False


@dataclass
class Campaign:
    path: Path
    root: Path
    checks_args: tuple[str, ...]
    checks_sources: tuple[str, ...]
    checks_estimate_s: float
    checks_limit_s: float
    bench: list[BenchSpec]
    bench_limit_s: float
    bench_smoke_args: tuple[str, ...]
    runs: list[RunSpec]
    defaults: tuple[str, ...]
    spline_overrides: tuple[str, ...]
    spline_spacings: tuple[int, ...]
    priors: dict[str, Any]
    max_concurrent: int
    pack_reserve_s: float
    dry: dict[str, Any] = field(default_factory=dict)

    def run(self, name: str) -> RunSpec:
        for r in self.runs:
            if r.name == name:
                return r
        raise CampaignError(f"no run named {name!r} in {self.path}; runs: {', '.join(r.name for r in self.runs)}")

    def spacings(self, dry_run: bool) -> tuple[int, ...]:
        return tuple(self.dry["spline_spacings"]) if dry_run else self.spline_spacings

    def run_priors(self, dry_run: bool) -> dict[str, Any]:
        return dict(self.dry["priors"]) if dry_run else dict(self.priors)


def _need(tree: dict, key: str, where: str, kind=None):
    if key not in tree:
        raise CampaignError(f"{where}: missing '{key}'")
    value = tree[key]
    if kind is not None and not isinstance(value, kind):
        raise CampaignError(f"{where}.{key} must be a {kind.__name__}, got {value!r}")
    return value


def _strings(values, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, (str, int, float)) for v in values):
        raise CampaignError(f"{where} must be a list of strings, got {values!r}")
    return tuple(str(v) for v in values)


def load_campaign(path: str | Path, root: str | Path = ".", validate_configs: bool = True) -> Campaign:
    """Read ``configs/campaign.yaml``; with ``validate_configs`` every run's config (GPU and dry-run) must load."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise CampaignError(f"campaign file {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    sets = {k: _strings(v, f"source_sets.{k}") for k, v in (tree.get("source_sets") or {}).items()}
    sources = _SourceFiles(root, sets)
    checks = _need(tree, "checks", "campaign", dict)
    bench_tree = _need(tree, "bench", "campaign", dict)
    bench = _bench_specs(bench_tree, root, sources)
    runs_tree = _need(tree, "runs", "campaign", dict)
    runs = _run_specs(runs_tree, root)
    names = [r.name for r in runs] + [b.name for b in bench]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CampaignError(f"{path}: names used twice: {dupes}")
    dry = tree.get("dry_run") or {}
    for key in ("run_overrides", "spline_overrides", "spline_spacings", "priors"):
        _need(dry, key, "dry_run")
    campaign = Campaign(
        path=path,
        root=root,
        checks_args=_strings(_need(checks, "args", "checks"), "checks.args"),
        checks_sources=sources(_need(checks, "sources", "checks"), "checks.sources"),
        checks_estimate_s=float(checks.get("estimate_s", 60)),
        checks_limit_s=float(checks.get("limit_s", 90)),
        bench=bench,
        bench_limit_s=float(bench_tree.get("limit_s", 120)),
        bench_smoke_args=_strings(bench_tree.get("smoke_args", ["--smoke"]), "bench.smoke_args"),
        runs=runs,
        defaults=_strings(runs_tree.get("defaults", []), "runs.defaults"),
        spline_overrides=_strings(runs_tree.get("spline_overrides", []), "runs.spline_overrides"),
        spline_spacings=tuple(int(s) for s in runs_tree.get("spline_spacings", (250, 500, 1000))),
        priors=dict(_need(runs_tree, "priors", "runs", dict)),
        max_concurrent=int(runs_tree.get("max_concurrent", 1)),
        pack_reserve_s=float(tree.get("pack_reserve_s", 15)),
        dry=dict(dry),
    )
    if validate_configs:
        for run in runs:
            for dry_run in (False, True):
                try:
                    load_config(root / run.config, run_overrides(campaign, run, dry_run))
                except ConfigError as exc:
                    raise CampaignError(f"run {run.name}{' (dry run)' if dry_run else ''}: {exc}") from None
    return campaign


class _SourceFiles:
    """A ``sources`` list with ``@set`` entries expanded, every file checked to exist."""

    def __init__(self, root: Path, sets: dict[str, tuple[str, ...]]) -> None:
        self.root, self.sets = root, sets

    def __call__(self, values, where: str) -> tuple[str, ...]:
        out = []
        for v in _strings(values, where):
            if v.startswith("@"):
                if v[1:] not in self.sets:
                    raise CampaignError(f"{where}: unknown source set {v!r}; sets: {sorted(self.sets)}")
                out.extend(self.sets[v[1:]])
            else:
                out.append(v)
        missing = [s for s in out if not (self.root / s).is_file()]
        if missing:
            raise CampaignError(f"{where}: source files not found: {missing}")
        return tuple(out)


def _bench_specs(bench_tree: dict, root: Path, sources: _SourceFiles) -> list[BenchSpec]:
    bench = []
    for i, b in enumerate(_need(bench_tree, "scripts", "bench", list)):
        where = f"bench.scripts[{i}]"
        name = str(_need(b, "name", where))
        script = str(b.get("script", f"bench/{name}.py"))
        if not (root / script).is_file():
            raise CampaignError(f"{where}: script {script} not found")
        bench.append(BenchSpec(name, script, _strings(b.get("args", []), f"{where}.args"),
                               sources(b.get("sources", [script]), f"{where}.sources"),
                               float(b.get("estimate_s", 60))))  # fmt: skip
    return bench


def _run_specs(runs_tree: dict, root: Path) -> list[RunSpec]:
    runs = []
    for i, r in enumerate(_need(runs_tree, "list", "runs", list)):
        where = f"runs.list[{i}]"
        name = str(_need(r, "name", where))
        if not NAME.fullmatch(name):
            raise CampaignError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (a folder name)")
        config = str(_need(r, "config", where))
        if not (root / config).is_file():
            raise CampaignError(f"{where} ({name}): config {config} not found")
        runs.append(RunSpec(name, config, _strings(r.get("overrides", []), f"{where}.overrides"),
                            str(r.get("group", "other")), " ".join(str(r.get("why", "")).split()),
                            bool(r.get("spline", False))))  # fmt: skip
    return runs


def run_overrides(campaign: Campaign, run: RunSpec, dry_run: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """Campaign defaults < spline settings < the run's own overrides < dry-run stand-ins < ``extra`` (where the
    run directory goes), and the run's name."""
    out = [*campaign.defaults]
    if run.spline:
        out += campaign.spline_overrides
    out += run.overrides
    if dry_run:
        out += _strings(campaign.dry["run_overrides"], "dry_run.run_overrides")
        if run.spline:
            out += _strings(campaign.dry["spline_overrides"], "dry_run.spline_overrides")
    return [*out, *extra, f"run.name={run.name}"]


def resolve(campaign: Campaign, run: RunSpec, dry_run: bool, extra: tuple[str, ...] = ()) -> Config:
    return load_config(campaign.root / run.config, run_overrides(campaign, run, dry_run, extra))


def reproduce_command(campaign: Campaign, run: RunSpec, dry_run: bool) -> str:
    """The ``python -m train`` line that trains this run without the evidence machinery."""
    return shlex.join(["python", "-m", "train", run.config, *run_overrides(campaign, run, dry_run)])


def config_digest(cfg: Config | dict[str, Any]) -> str:
    """SHA-256 of what a run computes: the model, data (not its cache), optimizer and schedule sections and the
    seed. Runs that differ only in logging, checkpointing or where they ran have the same digest."""
    tree = cfg.to_dict() if isinstance(cfg, Config) else cfg
    core = {k: tree[k] for k in COMPUTE_SECTIONS if k in tree}
    core.get("data", {}).pop("cache_dir", None)
    core["seed"] = tree.get("run", {}).get("seed")
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=list).encode()).hexdigest()


def config_changes(old: dict[str, Any], new: Config) -> list[str]:
    """``section.field: old -> new`` for the computing fields that differ (why a committed run is stale)."""
    a, b = _flat(old), _flat(new.to_dict())
    keys = sorted(k for k in a.keys() | b.keys() if k.split(".")[0] in COMPUTE_SECTIONS and k != "data.cache_dir")
    seed = [] if old.get("run", {}).get("seed") == new.run.seed else [f"run.seed: {old.get('run', {}).get('seed')} -> "
                                                                       f"{new.run.seed}"]  # fmt: skip
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys if _plain(a.get(k)) != _plain(b.get(k))] + seed


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------------------------------- bookkeeping
def source_hash(root: str | Path, sources: tuple[str, ...] | list[str]) -> str:
    """SHA-256 over the (path, bytes) of every source file, in sorted order: the code a result depends on."""
    digest = hashlib.sha256()
    for rel in sorted(set(sources)):
        digest.update(rel.encode() + b"\0")
        digest.update((Path(root) / rel).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def slug(text: str) -> str:
    """A device or host name as a folder name: ``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def piece_folder(part: str, device_slug: str, digest: str, name: str | None = None) -> str:
    """Where a check or benchmark result lives under results/: ``checks/<device>-<hash12>`` or
    ``bench/<name>/<device>-<hash12>``."""
    leaf = f"{device_slug}-{digest[:12]}"
    return f"checks/{leaf}" if part == "checks" else f"bench/{name}/{leaf}"


def committed_folder(results: Path, folder: str) -> Path | None:
    """The committed result folder, if it is complete (its provenance.json says so)."""
    f = results / folder / "provenance.json"
    if not f.is_file():
        return None
    try:
        status = json.loads(f.read_text()).get("status")
    except json.JSONDecodeError:
        return None
    return f.parent if status in ("done", "failed") else None


@dataclass(frozen=True)
class RunState:
    name: str
    state: str  # "done", "pending", "stale"
    detail: str


def run_states(campaign: Campaign, results: Path, dry_run: bool) -> list[RunState]:
    """For every campaign run, in priority order: done (committed with this config), stale (committed with another
    config: pending again), or pending."""
    out = []
    for run in campaign.runs:
        record = results / "runs" / run.name / "run.json"
        if not record.is_file():
            out.append(RunState(run.name, "pending", "not in results/ yet"))
            continue
        committed = json.loads(record.read_text())
        cfg = resolve(campaign, run, dry_run)
        if committed.get("config_digest") == config_digest(cfg):
            out.append(RunState(run.name, "done", f"{committed.get('device', {}).get('name', '?')}, "
                                                  f"window {committed.get('window', '?')}"))  # fmt: skip
        else:
            changes = config_changes(committed.get("config", {}), cfg) or ["(digest differs)"]
            out.append(RunState(run.name, "stale", "committed with another config: " + "; ".join(changes[:4])))
    return out
