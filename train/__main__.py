"""``python -m train CONFIG.yaml [section.field=value ...]``: one training run; prints where its outputs are."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

#: What the trainer imports beyond the library, by import name (the ``train`` extra of pyproject.toml).
TRAIN_EXTRA = ("yaml", "transformers", "datasets", "tokenizers", "safetensors", "tqdm")

#: Exit status when the run stopped on NaN/Inf (2: it could not start as asked).
EXIT_NONFINITE = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a YAML file in configs/ (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. optim.lr=3e-3 run.seed=2")
    args = parser.parse_args(argv)
    missing = [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        print(f"python -m train needs the trainer's dependencies, missing here: {', '.join(missing)}. Install them "
              "with: pip install 'instrumented-adamw[train]' (or `make demo` in a checkout)",
              file=sys.stderr)  # fmt: skip
        return 2
    from train.config import ConfigError, load_config

    try:  # before torch and transformers are imported: a bad config is named within a second
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from train.checkpoint import StateError
    from train.data import DataUnavailableError
    from train.loop import DeviceUnavailableError, NonFiniteError, Preempted, summary_line, train
    from train.models import PretrainedUnavailableError
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
    except Preempted as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            again = "the same torchrun command" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else shlex.join(
                ["python", "-m", "train", args.config, *args.overrides])  # fmt: skip
            print(f"[train] {exc}. To continue from step {exc.step}: {again}", file=sys.stderr, flush=True)
        return 128 + exc.signum  # what a process killed by the signal reports to its scheduler
    finally:
        _close_process_group(clean)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_line(run_dir))
        print(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, forces.jsonl, weibull.jsonl, checkpoints/)")
        if cfg.logging.report:
            from instrumented_adamw.analysis.report import make_report

            result = make_report([run_dir], run_dir / "report")
            print(f"report: {run_dir / 'report' / 'report.html'}  ({len(result['files']) - 1} figures beside it)")
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
