"""``python -m train CONFIG.yaml [section.field=value ...]``: one training run; prints where its outputs are."""

from __future__ import annotations

import argparse
import os
import sys

from train.config import ConfigError, load_config
from train.data import DataUnavailableError
from train.models import PretrainedUnavailableError

#: Exit status when the run stopped on NaN/Inf (2: it could not start as asked).
EXIT_NONFINITE = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a YAML file in configs/ (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. optim.lr=3e-3 run.seed=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from train.checkpoint import StateError
    from train.loop import DeviceUnavailableError, NonFiniteError, summary_line, train
    from train.rundir import RunDirError

    clean = False
    try:
        run_dir = train(cfg)
        clean = True
    except (DataUnavailableError, PretrainedUnavailableError, DeviceUnavailableError, RunDirError, StateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        _close_process_group(clean)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_line(run_dir))
        print(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, forces.jsonl, weibull.jsonl, checkpoints/)")
        if cfg.logging.report:
            from instrumented_adamw.analysis.report import make_report

            result = make_report([run_dir], run_dir / "report")
            print(f"figures: {run_dir / 'report'}  (report.html, {len(result['files']) - 1} PNGs)")
    return 0


def _close_process_group(clean: bool) -> None:
    """Leave the process group explicitly: a rank that exits while a peer still holds the group can abort (gloo
    aborts at interpreter teardown). After a finished run every rank meets at a barrier first; after an error a
    barrier could wait forever on a rank that is elsewhere, so the group is only destroyed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
