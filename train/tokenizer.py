"""``python -m train.tokenizer CONFIG OUT.json [--vocab N] [section.field=value ...]``: a small byte-level BPE.

Trained with ``tokenizers`` on the training files of a ``data.source=local`` config (the same documents the run
reads, split the same way). Why: the GPT-NeoX vocabulary (50k) makes the embedding and head dominate a small model
on a CPU (~7 s/step at hidden 128 on 2 cores); 8k merges keep English compact at a fraction of that. Byte-level, so
every byte sequence has an encoding: no text is ever mapped to an unknown-token bucket. ``<|endoftext|>`` (id 0)
separates documents, as in the GPT-NeoX tokenizer. Training is deterministic for a given corpus and vocabulary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.config import ConfigError, load_config
from train.data import DataUnavailableError, expand_files, local_documents

EOS = "<|endoftext|>"


def train_tokenizer(files: list[Path], vocab_size: int, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())  # no unk_token: byte-level coverage makes one unnecessary
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(local_documents(files), trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config with data.source=local (its data.train_files are read)")
    parser.add_argument("out", help="where to write tokenizer.json")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size, special token included")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.source != "local":
            raise ConfigError(f"data.source must be local to train a tokenizer on its files, got {cfg.data.source}")
        out = train_tokenizer(expand_files(cfg.data.train_files), args.vocab, Path(args.out))
    except (ConfigError, DataUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(out)).get_vocab_size()
    print(f"{out}: byte-level BPE, {size} tokens ({EOS} = {Tokenizer.from_file(str(out)).token_to_id(EOS)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
