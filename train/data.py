"""Token data: hub (``datasets``), local files or a generated corpus → a memory-mapped uint16 cache → batches.

Documents are tokenized once, joined with EOS between them, and stored as ``<key>.bin`` (uint16) + ``<key>.json``
(metadata) under ``data.cache_dir``; the key hashes the source (paths, sizes, mtimes or hub coordinates), the
tokenizer and the format version, so a changed input makes a new cache and an unchanged one is reused. Writes go to
a temporary file renamed into place: a killed run never leaves a half-written cache behind.

Batches are a pure function of (seed, step): the order of non-overlapping chunks is a fixed permutation per epoch,
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from instrumented_adamw.utils.durable_io import write_durably
from instrumented_adamw.utils.netcheck import endpoint_reachable
from train.config import DataConfig

#: Part of every cache key: bump it whenever tokenization, document joining or the synthetic generator change, so
#: an old cache is never served for new code (version 2: the synthetic corpus generates exactly n tokens).
CACHE_VERSION = 2
#: Articles of WikiText files start with a " = Title = " line (subsections use " = = ... = = ").
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
_TEXT_SUFFIXES = (".txt", ".raw", ".tokens")


class DataUnavailableError(RuntimeError):
    """The requested data or tokenizer cannot be loaded here; the message names the local alternative."""


def offline_hint(tokenizer: str) -> str:
    """What to do without the hub: things a user can actually fetch on a machine that has network."""
    tok = f"`hf download {tokenizer} tokenizer.json --local-dir TOK`" if "/" in tokenizer else "its tokenizer.json"
    return (
        "train without the hub instead: on a machine with network, pre-tokenize the data once "
        "(`python -m train.pretokenize CONFIG OUT`), copy OUT here and set data.source=tokens "
        "data.train_files=[OUT/train.bin] data.valid_files=[OUT/valid.bin]; or train on your own text files with "
        f"data.source=local data.train_files=[...] data.tokenizer=TOK/tokenizer.json (fetched there with {tok}). "
        "With the dataset and tokenizer already in this machine's Hugging Face cache, set HF_HUB_OFFLINE=1 and "
        "HF_DATASETS_OFFLINE=1"
    )


# ---------------------------------------------------------------------------------------------- documents
def split_wikitext(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines into articles at each top-level ' = Title = ' heading."""
    article: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line.rstrip("\n")) and any(s.strip() for s in article):
            yield "".join(article)
            article = []
        article.append(line)
    if any(s.strip() for s in article):
        yield "".join(article)


def expand_files(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataUnavailableError(f"data file pattern {pattern!r} matches nothing")
        files.extend(Path(m) for m in matches)
    return files


def local_documents(files: list[Path]) -> Iterator[str]:
    """One document per book-like text file; WikiText-formatted files are split into articles; parquet rows
    (column ``text``) through ``datasets``."""
    for f in files:
        if f.suffix == ".parquet":
            import datasets

            table = datasets.load_dataset("parquet", data_files=str(f), split="train")
            if "text" not in table.column_names:
                raise DataUnavailableError(f"{f} has no 'text' column (columns: {table.column_names})")
            yield from (t for t in table["text"] if t)
        elif f.suffix in _TEXT_SUFFIXES:
            with f.open(encoding="utf-8") as fh:
                lines = fh.readlines()
            if any(_WIKITEXT_TITLE.match(line.rstrip("\n")) for line in lines[:5]):
                yield from split_wikitext(lines)
            else:
                yield "".join(lines)
        else:
            raise DataUnavailableError(f"{f}: unsupported file type {f.suffix!r} (use .txt, .raw, .tokens, .parquet)")


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect within ``timeout`` seconds (default
    :data:`instrumented_adamw.utils.netcheck.PROBE_TIMEOUT_S`), instead of the hub client's retry loops. Offline mode
    (``HF_HUB_OFFLINE``) answers no at once; behind a proxy the probe defers to the client. The one hub probe of
    the trainer: data, tokenizers and pretrained models all ask here."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    return endpoint_reachable(constants.ENDPOINT, timeout)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The hub client in offline mode for the duration: cache lookups only. ``local_files_only`` alone is not
    enough — the client still makes calls of its own (e.g. fetching its agent registry), which stall for their
    timeouts on a network that drops packets."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_documents(path: str, name: str, split: str, tokenizer: str = "EleutherAI/pythia-70m") -> Iterator[str]:
    import datasets

    if not os.environ.get("HF_DATASETS_OFFLINE") and not hub_reachable():
        raise DataUnavailableError(
            f"cannot reach the Hugging Face hub to load {path} ({name}, split {split}); {offline_hint(tokenizer)}."
        )
    try:
        rows = datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # offline mode, missing cache, connection errors: all mean "not available here"
        raise DataUnavailableError(
            f"could not load {path} ({name}, split {split}): {exc}; {offline_hint(tokenizer)}"
        ) from exc
    yield from split_wikitext(rows["text"])


# ---------------------------------------------------------------------------------------------- tokenizers
class Tokenizer:
    """A `tokenizers.Tokenizer` (from tokenizer.json or the hub) or the identity tokenizer of the synthetic corpus."""

    def __init__(self, backend, eos_id: int, fingerprint: str) -> None:
        self.backend, self.eos_id, self.fingerprint = backend, eos_id, fingerprint

    def encode(self, docs: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(docs)]


def load_tokenizer(spec: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(os.path.expanduser(spec))
    if path.is_file():
        backend = HFTokenizer.from_file(str(path))
    elif path.suffix == ".json" or spec.startswith((".", "/")):
        raise DataUnavailableError(f"tokenizer file {spec} does not exist")
    else:
        if not hub_reachable():
            raise DataUnavailableError(
                f"cannot reach the Hugging Face hub to fetch tokenizer {spec!r}; {offline_hint(spec)}"
            )
        try:
            backend = HFTokenizer.from_pretrained(spec)
        except Exception as exc:
            raise DataUnavailableError(f"could not fetch tokenizer {spec!r}: {exc}; {offline_hint(spec)}") from exc
    eos = backend.token_to_id("<|endoftext|>")
    if eos is None:
        raise DataUnavailableError(f"tokenizer {spec!r} has no <|endoftext|> token to separate documents")
    fingerprint = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
    return Tokenizer(backend, eos, fingerprint)


# ---------------------------------------------------------------------------------------------- synthetic corpus
def synthetic_tokens(vocab: int, n_tokens: int, seed: int, doc_len: int = 1000, fanout: int = 8) -> np.ndarray:
    """Documents from a random sparse Markov chain over ids 1..vocab−1, EOS (id 0) between documents.

    Each token has ``fanout`` possible successors with Zipf-like probabilities, so the text has learnable structure
    (entropy ≈ 1.5 nats against ln(vocab)). The chains of all documents advance together: vectorised, fast.
    """
    rng = np.random.default_rng(seed)
    successors = rng.integers(1, vocab, size=(vocab, fanout))
    weights = 1.0 / np.arange(1, fanout + 1) ** 1.2
    cdf = np.cumsum(weights / weights.sum())
    n_docs = max(1, -(-n_tokens // (doc_len + 1)))  # ceil: enough documents for n_tokens
    out = np.empty((n_docs, doc_len + 1), dtype=np.uint16)
    out[:, 0] = 0  # EOS before each document
    state = rng.integers(1, vocab, size=n_docs)
    for t in range(1, doc_len + 1):
        out[:, t] = state
        pick = np.searchsorted(cdf, rng.random(n_docs), side="right").clip(max=fanout - 1)
        state = successors[state, pick]
    return out.reshape(-1)[:n_tokens]


# ---------------------------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class TokenFile:
    path: Path
    tokens: np.ndarray  # uint16 memmap
    meta: dict


def _cache_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _file_spec(files: list[Path]) -> list:
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def cached_tokens(cache_dir: Path, spec: dict, produce) -> TokenFile:
    """The token file for ``spec``; ``produce()`` (an iterable of uint16 arrays) runs only if it is not cached.

    The metadata file is written last and names the token count, so a cache entry is used only when both files
    are complete and agree; anything else (a kill or power loss mid-write) is rebuilt, never served."""
    spec = dict(spec, version=CACHE_VERSION)
    key = _cache_key(spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    meta = _cache_meta(path, meta_path)
    if meta is None:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        n = 0
        with tmp.open("wb") as fh:
            for part in produce():
                arr = np.asarray(part)
                if arr.size and int(arr.max()) > np.iinfo(np.uint16).max:
                    raise ValueError(f"token id {int(arr.max())} does not fit the uint16 cache")
                fh.write(arr.astype(np.uint16).tobytes())
                n += arr.size
            fh.flush()
            os.fsync(fh.fileno())
        if n < 2:
            tmp.unlink()
            raise DataUnavailableError(f"the data source {spec['source']} produced no tokens")
        os.replace(tmp, path)
        meta = dict(spec=spec, n_tokens=n)
        write_durably(meta_path, json.dumps(meta, indent=1).encode())
    return TokenFile(path, np.memmap(path, dtype=np.uint16, mode="r"), meta)


def _cache_meta(path: Path, meta_path: Path) -> dict | None:
    """The metadata of a complete cache entry, or ``None`` when it is missing, unreadable or disagrees with the
    token file's size."""
    try:
        meta = json.loads(meta_path.read_text())
        complete = path.stat().st_size == 2 * int(meta["n_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


def _tokenize(docs: Iterable[str], tok: Tokenizer, batch: int = 64) -> Iterator[np.ndarray]:
    pending: list[str] = []
    for doc in docs:
        pending.append(doc)
        if len(pending) == batch:
            yield _join(tok.encode(pending), tok.eos_id)
            pending = []
    if pending:
        yield _join(tok.encode(pending), tok.eos_id)


def _join(encoded: list[list[int]], eos: int) -> np.ndarray:
    parts = []
    for ids in encoded:
        parts.append(np.asarray(ids, dtype=np.int64))
        parts.append(np.asarray([eos], dtype=np.int64))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------- datasets of tokens
@dataclass
class TokenData:
    """Training and validation token streams with deterministic batching."""

    train: np.ndarray
    valid: np.ndarray
    seq_len: int
    batch_size: int
    windows: str
    seed: int
    describe: str

    def __post_init__(self) -> None:
        self.n_chunks = (len(self.train) - 1) // self.seq_len
        if self.n_chunks < 1 or (len(self.valid) - 1) // self.seq_len < 1:
            raise DataUnavailableError(
                f"{self.describe}: {len(self.train)} training / {len(self.valid)} validation tokens are fewer than "
                f"one sequence of {self.seq_len + 1}"
            )
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of optimizer step ``step`` for ``rank``: its rows of the global batch, [b, seq_len]."""
        if self.batch_size % world:
            raise ValueError(f"data.batch_size={self.batch_size} is not divisible by {world} ranks")
        per = self.batch_size // world
        first = step * self.batch_size + rank * per
        L = self.seq_len
        if self.windows == "chunks":
            starts = []
            for i in range(first, first + per):
                epoch, pos = divmod(i, self.n_chunks)
                starts.append(int(self._permutation(epoch)[pos]) * L)
        else:
            rng = np.random.default_rng([self.seed, step, 1])
            starts = rng.integers(0, len(self.train) - L - 1, size=self.batch_size)[rank * per : (rank + 1) * per]
        return _rows(self.train, starts, L)

    def valid_batches(self, n_batches: int, rank: int = 0, world: int = 1):
        """The first ``n_batches`` batches of contiguous validation chunks, in order (identical every eval).

        Only whole global batches are used, so every rank runs the same number of forward passes (under FSDP a
        forward pass is a collective); a validation split smaller than one batch is used whole by a single process.
        """
        per = self.batch_size // world
        n_valid = (len(self.valid) - 1) // self.seq_len
        full = min(n_batches, n_valid // self.batch_size)
        if full == 0:
            if world > 1:
                raise DataUnavailableError(
                    f"{self.describe}: the validation split has {n_valid} sequences, fewer than one global batch "
                    f"of {self.batch_size}; several ranks need at least one"
                )
            yield _rows(self.valid, [i * self.seq_len for i in range(n_valid)], self.seq_len)
            return
        for b in range(full):
            first = b * self.batch_size + rank * per
            yield _rows(self.valid, [i * self.seq_len for i in range(first, first + per)], self.seq_len)


def _rows(tokens: np.ndarray, starts, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    block = np.stack([np.asarray(tokens[s : s + L + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(block)
    return t[:, :-1], t[:, 1:]


def build_data(cfg: DataConfig, seed: int) -> TokenData:
    """Tokenize (or reuse the cache) and wrap the streams. Call on one rank first under data parallelism."""
    cache = Path(cfg.cache_dir)
    if cfg.source == "synthetic":
        spec = dict(source="synthetic", vocab=cfg.synthetic_vocab, n=cfg.synthetic_tokens, seed=cfg.synthetic_seed)
        n_valid = max(cfg.seq_len + 1, int(cfg.synthetic_tokens * 0.05))
        train = cached_tokens(
            cache,
            dict(spec, split="train"),
            lambda: [synthetic_tokens(cfg.synthetic_vocab, cfg.synthetic_tokens, cfg.synthetic_seed)],
        )
        # Same chain (same seed for the transition table), different documents.
        valid = cached_tokens(
            cache,
            dict(spec, split="valid", n_valid=n_valid),
            lambda: [_synthetic_valid(cfg, n_valid)],
        )
        describe = f"synthetic Markov corpus (vocab {cfg.synthetic_vocab}, seed {cfg.synthetic_seed})"
        return _wrap(cfg, seed, train.tokens, valid.tokens, describe)

    if cfg.source == "tokens":
        # Pre-tokenized uint16 streams (documents already joined with EOS): no tokenizer, no cache.
        train_tokens = _concat_tokens(expand_files(cfg.train_files))
        if cfg.valid_files:
            valid = _concat_tokens(expand_files(cfg.valid_files))
        else:
            train_tokens, valid = _hold_out(train_tokens, cfg.valid_fraction)
        return _wrap(cfg, seed, train_tokens, valid, f"token files {cfg.train_files}")

    tok = load_tokenizer(cfg.tokenizer)
    if cfg.source == "local":
        train_files = expand_files(cfg.train_files)
        spec = dict(source="local", files=_file_spec(train_files), tokenizer=tok.fingerprint)
        train = cached_tokens(cache, spec, lambda: _tokenize(local_documents(train_files), tok))
        if cfg.valid_files:
            valid_files = expand_files(cfg.valid_files)
            vspec = dict(source="local", files=_file_spec(valid_files), tokenizer=tok.fingerprint)
            valid = cached_tokens(cache, vspec, lambda: _tokenize(local_documents(valid_files), tok)).tokens
            train_tokens = train.tokens
        else:
            train_tokens, valid = _hold_out(train.tokens, cfg.valid_fraction)
        describe = f"local files ({len(train_files)} train) with tokenizer {cfg.tokenizer}"
        return _wrap(cfg, seed, train_tokens, valid, describe)

    hub = dict(source="hf", path=cfg.hf_path, name=cfg.hf_name, tokenizer=tok.fingerprint)
    train = cached_tokens(
        cache,
        dict(hub, split="train"),
        lambda: _tokenize(hub_documents(cfg.hf_path, cfg.hf_name, "train", cfg.tokenizer), tok),
    )
    valid = cached_tokens(
        cache,
        dict(hub, split="validation"),
        lambda: _tokenize(hub_documents(cfg.hf_path, cfg.hf_name, "validation", cfg.tokenizer), tok),
    )
    return _wrap(cfg, seed, train.tokens, valid.tokens, f"{cfg.hf_path} ({cfg.hf_name})")


def _concat_tokens(files: list[Path]) -> np.ndarray:
    for f in files:
        if f.suffix != ".bin" or f.stat().st_size % 2:
            raise DataUnavailableError(f"{f} is not a uint16 token file (.bin, an even number of bytes)")
    parts = [np.memmap(f, dtype=np.uint16, mode="r") for f in files]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def export_tokens(cfg: DataConfig, seed: int, out: Path) -> dict[str, Path]:
    """Write the training and validation token streams of ``cfg`` as ``train.bin`` / ``valid.bin`` (uint16) plus
    ``tokens.json`` (where they came from): what a machine without the raw text trains on with data.source=tokens."""
    data = build_data(cfg, seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / "train.bin", "valid": out / "valid.bin"}
    for split, arr in (("train", data.train), ("valid", data.valid)):
        np.asarray(arr, dtype=np.uint16).tofile(files[split])
    meta = dict(source=data.describe, train_tokens=len(data.train), valid_tokens=len(data.valid),
                tokenizer=cfg.tokenizer, cache_version=CACHE_VERSION)  # fmt: skip
    (out / "tokens.json").write_text(json.dumps(meta, indent=1))
    return files


def _synthetic_valid(cfg: DataConfig, n: int) -> np.ndarray:
    # The transition table depends only on the seed: a longer draw is the same chain with other documents.
    both = synthetic_tokens(cfg.synthetic_vocab, cfg.synthetic_tokens + n, cfg.synthetic_seed)
    return both[-n:]


def _hold_out(tokens: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = len(tokens) - max(2, int(len(tokens) * fraction))
    return tokens[:cut], tokens[cut:]


def _wrap(cfg: DataConfig, seed: int, train: np.ndarray, valid: np.ndarray, describe: str) -> TokenData:
    if cfg.max_train_tokens is not None:
        train = train[: cfg.max_train_tokens]
    return TokenData(train, valid, cfg.seq_len, cfg.batch_size, cfg.windows, seed, describe)
