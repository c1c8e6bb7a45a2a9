"""Data pipeline: local corpus + tokenizer.json, synthetic corpus, chunking, EOS, determinism, cache reuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from train import data as D
from train.config import DataConfig

_WORDS = "it was the best of times worst age wisdom foolishness epoch belief incredulity season light darkness".split()
BOOK = " ".join(np.random.default_rng(0).choice(_WORDS, 1500))  # no two chunks alike
WIKI = " = Alpha = \n Alpha is a letter . \n = = History = = \n It is old . \n = Beta = \n Beta follows alpha . \n"


@pytest.fixture()
def corpus(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "book.txt").write_text(BOOK)
    (tmp_path / "train" / "wiki.tokens").write_text(WIKI)
    (tmp_path / "valid.txt").write_text("The worst of times was the best of times. " * 20)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "<unk>"])
    tok.train_from_iterator([BOOK, WIKI], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def local_cfg(root, **kw) -> DataConfig:
    base = dict(
        source="local",
        train_files=[str(root / "train" / "*")],
        valid_files=[str(root / "valid.txt")],
        tokenizer=str(root / "tokenizer.json"),
        seq_len=16,
        batch_size=4,
        cache_dir=str(root / "cache"),
    )
    return DataConfig(**{**base, **kw})


def test_wikitext_files_split_into_articles():
    articles = list(D.split_wikitext(WIKI.splitlines(keepends=True)))
    assert len(articles) == 2 and articles[0].startswith(" = Alpha = ") and "History" in articles[0]
    assert articles[1].startswith(" = Beta = ")


def test_local_corpus_documents_are_separated_by_eos_and_cached(corpus):
    cfg = local_cfg(corpus)
    data = D.build_data(cfg, seed=1)
    tok = D.load_tokenizer(cfg.tokenizer)
    eos = tok.eos_id
    # book (1 document) + wiki (2 articles) -> 3 EOS, each after its document, in file order.
    docs = list(D.local_documents(D.expand_files(cfg.train_files)))
    expected = np.concatenate([np.append(tok.encode([d])[0], eos) for d in docs])
    assert np.array_equal(data.train, expected) and (data.train == eos).sum() == 3
    assert data.valid[-1] == eos
    files = sorted((corpus / "cache").glob("*.bin"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    D.build_data(cfg, seed=1)  # reused, not rewritten
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    (corpus / "train" / "book.txt").write_text(BOOK + "More text.")  # changed input -> new cache entry
    D.build_data(cfg, seed=1)
    assert len(list((corpus / "cache").glob("*.bin"))) == 3


def test_chunks_are_contiguous_non_overlapping_and_deterministic(corpus):
    data = D.build_data(local_cfg(corpus), seed=3)
    L, n = data.seq_len, data.n_chunks
    starts = []
    steps_per_epoch = n // data.batch_size
    for step in range(steps_per_epoch):
        x, y = data.batch(step)
        assert x.shape == (4, L) and y.shape == (4, L)
        assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())  # targets are the next tokens
        for row in x.numpy():
            s = int(np.flatnonzero([np.array_equal(data.train[c * L : c * L + L], row) for c in range(n)])[0])
            starts.append(s)
    assert len(set(starts)) == len(starts)  # no chunk twice within an epoch
    again = D.build_data(local_cfg(corpus), seed=3)
    assert all(np.array_equal(data.batch(s)[0], again.batch(s)[0]) for s in range(3))
    other = D.build_data(local_cfg(corpus), seed=4)
    assert not np.array_equal(data.batch(0)[0], other.batch(0)[0])
    # Data-parallel ranks take disjoint rows of the same global batch.
    x0, _ = data.batch(5, rank=0, world=2)
    x1, _ = data.batch(5, rank=1, world=2)
    assert np.array_equal(np.concatenate([x0, x1]), data.batch(5)[0].numpy())


def test_random_windows_and_held_out_split(corpus):
    data = D.build_data(local_cfg(corpus, windows="random", valid_files=[], valid_fraction=0.2), seed=1)
    x, y = data.batch(0)
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert len(data.valid) >= 0.2 * (len(data.train) + len(data.valid)) - 1
    batches = list(data.valid_batches(3))
    assert batches and all(b[0].shape[1] == 16 for b in batches)


def test_synthetic_corpus_is_structured_and_deterministic():
    a = D.synthetic_tokens(64, 20_000, seed=1)
    b = D.synthetic_tokens(64, 20_000, seed=1)
    assert np.array_equal(a, b) and a.dtype == np.uint16 and a.max() < 64
    assert len(a) == 20_000 and (a == 0).sum() == 20  # EOS before each of the ceil(20000 / 1001) documents
    # Each token has at most 8 successors: far from uniform, so a model can learn it.
    pairs = {(int(p), int(q)) for p, q in zip(a[:-1], a[1:], strict=True) if p and q}
    assert len(pairs) <= 63 * 8


def test_hub_unreachable_fails_fast_naming_the_local_path(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(D.DataUnavailableError, match="data.source=local"):
        D.build_data(DataConfig(source="hf", tokenizer="EleutherAI/pythia-70m", cache_dir=str(tmp_path)), seed=1)
    with pytest.raises(D.DataUnavailableError, match="cannot reach the Hugging Face hub to load Salesforce/wikitext"):
        list(D.hub_documents("Salesforce/wikitext", "wikitext-103-raw-v1", "train"))


def test_bad_inputs_are_named(corpus, tmp_path):
    with pytest.raises(D.DataUnavailableError, match="matches nothing"):
        D.build_data(local_cfg(corpus, train_files=[str(tmp_path / "nope" / "*.txt")]), seed=1)
    with pytest.raises(D.DataUnavailableError, match="tokenizer file .* does not exist"):
        D.build_data(local_cfg(corpus, tokenizer=str(tmp_path / "missing.json")), seed=1)
    with pytest.raises(D.DataUnavailableError, match="fewer than one sequence"):
        D.build_data(local_cfg(corpus, seq_len=100_000), seed=1)


def test_hub_probe_answers_fast(monkeypatch):
    """A hub address where connections are refused (a socket bound here, never listening): the probe says no at
    once. Hermetic: no fixed port, no reliance on what listens on this machine."""
    import socket
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"https://127.0.0.1:{closed.getsockname()[1]}")
        t0 = time.perf_counter()
        assert D.hub_reachable(timeout=2.0) is False
        assert time.perf_counter() - t0 < 10.0  # refused at once; the bound only guards against a hang
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert D.hub_reachable() is True  # behind a proxy the client is left to try


def test_pretokenized_export_trains_on_the_same_batches(corpus, tmp_path):
    from train.pretokenize import main

    cfg = local_cfg(corpus)
    assert main([str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"), str(tmp_path / "tok"),
                 "data.source=local", f"data.train_files=[{corpus / 'train' / '*'}]",
                 f"data.valid_files=[{corpus / 'valid.txt'}]", f"data.tokenizer={corpus / 'tokenizer.json'}",
                 "data.seq_len=16", "data.batch_size=4", f"data.cache_dir={corpus / 'cache'}"]) == 0  # fmt: skip
    original = D.build_data(cfg, seed=1)
    tokens = D.build_data(
        DataConfig(source="tokens", train_files=[str(tmp_path / "tok" / "train.bin")],
                   valid_files=[str(tmp_path / "tok" / "valid.bin")], seq_len=16, batch_size=4), seed=1
    )  # fmt: skip
    assert np.array_equal(tokens.train, original.train) and np.array_equal(tokens.valid, original.valid)
    assert all(np.array_equal(tokens.batch(s)[0], original.batch(s)[0]) for s in range(3))
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(D.DataUnavailableError, match="not a uint16 token file"):
        D.build_data(DataConfig(source="tokens", train_files=[str(tmp_path / "odd.bin")]), seed=1)


def test_a_cache_entry_cut_short_by_a_kill_is_rebuilt_not_served(tmp_path):
    calls = []

    def produce():
        calls.append(1)
        return [np.arange(1000, dtype=np.uint16)]

    spec = dict(source="test")
    first = D.cached_tokens(tmp_path, spec, produce)
    meta, data = next(tmp_path.glob("*.json")), first.path
    for damage in (lambda: meta.write_text('{"spec": {"source"'),  # metadata half-written
                   lambda: data.write_bytes(data.read_bytes()[:500]),  # tokens cut short (a power loss)
                   lambda: meta.unlink()):  # fmt: skip
        damage()
        again = D.cached_tokens(tmp_path, spec, produce)
        assert np.array_equal(again.tokens, np.arange(1000)) and again.meta["n_tokens"] == 1000
    assert len(calls) == 4  # built once, then rebuilt after each damage
    D.cached_tokens(tmp_path, spec, produce)
    assert len(calls) == 4  # an intact entry is reused


def test_study_tokenizer_is_byte_level_deterministic_and_has_no_unknown_bucket(corpus, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    from train.tokenizer import EOS, main

    cfg = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    args = [str(cfg), "data.source=local", f"data.train_files=[{corpus / 'train' / '*'}]", "--vocab", "600"]
    assert main([args[0], str(tmp_path / "a.json"), *args[1:]]) == 0
    assert main([args[0], str(tmp_path / "b.json"), *args[1:]]) == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()  # deterministic
    tok = HFTokenizer.from_file(str(tmp_path / "a.json"))
    assert 257 < tok.get_vocab_size() <= 600 and tok.token_to_id(EOS) == 0  # a tiny corpus has fewer merges
    text = "Ünïcode never seen in training: 日本語, emoji 🙂, tabs\tand <unk> stay text."
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text  # every byte has an encoding: nothing falls into an unknown bucket
    assert tok.model.unk_token is None
    loaded = D.load_tokenizer(str(tmp_path / "a.json"))
    assert loaded.eos_id == 0
    assert main([str(cfg), str(tmp_path / "c.json")]) == 2  # the demo config has no local files to learn from
