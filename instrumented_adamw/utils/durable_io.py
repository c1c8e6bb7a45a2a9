"""Durable writes and checksums for files that must survive a kill, a power loss or a damaged disk.

* :func:`fsync_file` / :func:`fsync_dir`: a rename is durable only once the renamed file *and* the directory
  holding the new name are on disk; ``os.replace`` alone orders nothing.
* :func:`write_manifest` / :func:`verify_manifest`: ``manifest.json`` in a directory lists every other file with
  its size and SHA-256, so a truncated or bit-flipped file is found before it is loaded. The manifest is written
  last, so a directory without one is incomplete.
* :func:`file_mark` / :func:`check_prefix`: the length and SHA-256 of an append-only file at some moment, and
  whether the file still starts with exactly those bytes (a log that was cut short or changed after the fact).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (names created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably: a temporary file, fsync'd, renamed, directory fsync'd.
    The temporary file is this process's and thread's own, so writers racing on one path (a sweep's runs filling
    the same token cache) each rename a whole file, and the last one wins."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike, limit: int | None = None) -> str:
    """SHA-256 of the file's first ``limit`` bytes (all of it when ``None``), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    left = limit
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(_CHUNK if left is None else min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checksum every file under ``directory`` into ``directory/manifest.json``; fsync the files, the manifest and
    the directories, so that after this returns the directory can be renamed into place durably."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        fsync_file(path)
        files[path.relative_to(directory).as_posix()] = dict(bytes=path.stat().st_size, sha256=sha256_file(path))
    manifest = dict(extra or {}, files=files)
    with (directory / MANIFEST).open("w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    for sub in sorted({p.parent for p in directory.rglob("*")} | {directory}, key=lambda p: -len(p.parts)):
        fsync_dir(sub)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest; raises ``ValueError`` naming what is wrong with it."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(f"{MANIFEST} is missing (the directory was never completed)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{MANIFEST} is unreadable ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise ValueError(f"{MANIFEST} does not list files with their sizes and checksums")
    return manifest


def verify_manifest(directory: Path, full: bool = True) -> list[str]:
    """Problems with ``directory`` against its manifest (empty: intact). ``full=False`` compares sizes only."""
    try:
        manifest = read_manifest(directory)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for name, want in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{name} has {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)")
        elif full and sha256_file(path) != want["sha256"]:
            problems.append(f"{name} does not match its SHA-256 checksum (the file is damaged)")
    return problems


def file_mark(path: Path) -> dict[str, Any]:
    """Length and SHA-256 of ``path`` now (0 bytes when it does not exist)."""
    if not path.is_file():
        return dict(bytes=0, sha256=hashlib.sha256().hexdigest())
    return dict(bytes=path.stat().st_size, sha256=sha256_file(path))


def check_prefix(path: Path, mark: dict[str, Any]) -> str | None:
    """``None`` when ``path`` starts with exactly the bytes ``mark`` describes, else what differs."""
    want = int(mark["bytes"])
    size = path.stat().st_size if path.is_file() else 0
    if size < want:
        return f"{path.name} has {size} bytes, fewer than the {want} it had then (cut short or replaced)"
    got = sha256_file(path, want) if want else hashlib.sha256().hexdigest()
    if got != mark["sha256"]:
        return f"{path.name} differs within its first {want} bytes from what was written (damaged or edited)"
    return None


def truncate_durably(path: Path, size: int) -> None:
    """Cut ``path`` to ``size`` bytes and make the new length durable."""
    with path.open("r+b") as fh:
        fh.truncate(size)
        fh.flush()
        os.fsync(fh.fileno())
