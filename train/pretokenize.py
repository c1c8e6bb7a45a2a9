"""``python -m train.pretokenize CONFIG OUT_DIR [section.field=value ...]``: write a run's token streams as
``OUT_DIR/train.bin`` and ``OUT_DIR/valid.bin`` (uint16, EOS between documents) for a machine that has neither the
raw text nor the hub — train there with ``data.source=tokens data.train_files=[OUT_DIR/train.bin]
data.valid_files=[OUT_DIR/valid.bin]``. The offline corpus (../shared/data/lmcorpus) packs to 38 MB this way."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.config import ConfigError, load_config
from train.data import DataUnavailableError, export_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.pretokenize", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        files = export_tokens(cfg.data, cfg.run.seed, Path(args.out))
    except (ConfigError, DataUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, path in files.items():
        print(f"{split}: {path} ({path.stat().st_size // 2:,} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
