"""The evidence bundle: packing into the few files a GPU window may return, and unpacking into
``results/``.

What a window may return: at most 8 files of at most 16 MiB, 64 MiB together, named in letters, digits, '.', '_'
and '-' (the device tool's limits). A bundle is

* ``manifest.json`` — the window: command, commit, device, versions, budget, every piece with its status, reason
  and timings, the run-time measurements, and each archive's size, SHA-256 and folders;
* ``evidence.log`` — the command's own log (the end of it, at most 1 MiB);
* ``results-NN.tar.gz`` — result folders exactly as they go under ``results/`` (``checks/<device>-<hash>/``,
  ``bench/<name>/<device>-<hash>/``, ``runs/<name>/``), whole folders per archive, each archive under the size
  limit. Figures are dropped first, then whole folders (lowest priority last in), when the limits do not hold
  everything; the manifest lists what was dropped and why.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.campaign import NAME

MIB = 1 << 20
MANIFEST = "manifest.json"
#: Room kept for manifest.json in the total (it lists pieces, timings and archives: tens of KiB).
MANIFEST_RESERVE = 256 * 1024
LOG = "evidence.log"
#: Top-level folders a bundle may hold.
PARTS = ("checks", "bench", "runs")


@dataclass(frozen=True)
class Limits:
    max_files: int = 8
    max_file_bytes: int = 16 * MIB
    max_total_bytes: int = 64 * MIB
    log_bytes: int = 1 * MIB


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def result_folders(staging: Path) -> list[Path]:
    """The result folders under ``staging``, in bundle priority: checks, benchmarks, runs (each in the order the
    caller listed them in ``staging/order.json`` when there is one)."""
    order = json.loads((staging / "order.json").read_text()) if (staging / "order.json").is_file() else []
    found = []
    for part in PARTS:
        base = staging / part
        if not base.is_dir():
            continue
        if part == "bench":
            found += sorted(d for b in base.iterdir() if b.is_dir() for d in b.iterdir() if d.is_dir())
        else:
            found += sorted(d for d in base.iterdir() if d.is_dir())
    rank = {name: i for i, name in enumerate(order)}
    return sorted(found, key=lambda d: (PARTS.index(d.relative_to(staging).parts[0]),
                                        rank.get(d.relative_to(staging).as_posix(), len(rank))))  # fmt: skip


def pack(staging: Path, out: Path, manifest: dict[str, Any], log_text: str, limits: Limits = Limits(),
         replace: bool = False) -> dict:  # fmt: skip
    """Write the bundle into ``out`` and return the manifest as written. ``out`` must be empty, or with ``replace``
    hold only an earlier bundle (rewritten as a window goes on, so that a window cut short keeps the last one)."""
    out.mkdir(parents=True, exist_ok=True)
    own = [p for p in out.iterdir() if p.name in (MANIFEST, LOG) or re.fullmatch(r"results-\d\d\.tar\.gz", p.name)]
    if any(p not in own for p in out.iterdir()) or (own and not replace):
        raise FileExistsError(f"{out} is not empty: the bundle must be the only thing in it")
    for p in own:
        p.unlink()
    dropped: list[dict[str, str]] = []
    folders = []
    for folder in result_folders(staging):
        rel = folder.relative_to(staging).as_posix()
        size = folder_bytes(folder)
        if size > limits.max_file_bytes * 0.95 and (folder / "figures").is_dir():
            shutil.rmtree(folder / "figures")
            dropped.append(dict(folder=rel, what="figures", why="the folder exceeded one file's limit with them; "
                                "`instrumented-adamw report` redraws them from the logs"))  # fmt: skip
            size = folder_bytes(folder)
        if size > limits.max_file_bytes * 0.95:
            dropped.append(dict(folder=rel, what="folder", why=f"{size / MIB:.1f} MiB exceeds one file's limit"))
            continue
        folders.append((rel, folder, size))
    # Whole folders into archives, first fit in priority order (a folder that fits no open archive opens one while
    # files are left); the manifest and the log take two of the files.
    slots = limits.max_files - 2
    budget = limits.max_total_bytes - limits.log_bytes - MANIFEST_RESERVE
    archives: list[list[tuple[str, Path, int]]] = []
    total = 0
    for rel, folder, size in folders:
        target = next((a for a in archives if sum(s for *_, s in a) + size <= limits.max_file_bytes * 0.95), None)
        if total + size > budget or (target is None and len(archives) >= slots):
            dropped.append(dict(folder=rel, what="folder", why="the bundle's file count or total size is used up"))
            continue
        if target is None:
            target = []
            archives.append(target)
        target.append((rel, folder, size))
        total += size
    files: dict[str, Any] = {}
    for i, content in enumerate(archives, start=1):
        name = f"results-{i:02d}.tar.gz"
        path = out / name
        with tarfile.open(path, "w:gz", compresslevel=6) as tar:
            for rel, folder, _ in content:
                for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                    info = tar.gettarinfo(str(f), arcname=f"{rel}/{f.relative_to(folder).as_posix()}")
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with f.open("rb") as fh:
                        tar.addfile(info, fh)
        if path.stat().st_size > limits.max_file_bytes:
            raise RuntimeError(f"{name} is {path.stat().st_size / MIB:.1f} MiB, over the limit (a packing bug)")
        files[name] = dict(bytes=path.stat().st_size, sha256=sha256(path), folders=[rel for rel, *_ in content])
    log = log_text.encode("utf-8")
    if len(log) > limits.log_bytes:
        log = b"[... the beginning is cut: the log exceeded 1 MiB ...]\n" + log[-(limits.log_bytes - 64) :]
    (out / LOG).write_bytes(log)
    written = dict(manifest, files=files, dropped=dropped, limits=vars(limits))
    (out / MANIFEST).write_text(json.dumps(written, indent=1, allow_nan=False) + "\n")
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= limits.max_files and all(NAME.fullmatch(n) for n in names), names
    return written


# ---------------------------------------------------------------------------------------------- unpack
class BundleError(ValueError):
    """A bundle is incomplete, damaged or would overwrite committed results; the message says which and why."""


def find_manifest(paths: list[Path]) -> Path:
    for p in paths:
        if p.is_dir() and (p / MANIFEST).is_file():
            return p / MANIFEST
        if p.name == MANIFEST and p.is_file():
            return p
    raise BundleError(f"no {MANIFEST} among {[str(p) for p in paths]}: give the folder the bundle was fetched into")


def unpack(paths: list[Path], results: Path, force: bool = False) -> dict[str, Any]:
    """Verify a fetched bundle and write its folders into ``results``. Refuses to change a committed folder unless
    ``force``; an identical one is skipped.

    A dry-run bundle goes into ``results/dry_run`` and always replaces: the same run, and the checks or benchmark
    of the same device under an older source hash, and the earlier dry-run window. That folder then holds the
    latest dry run of every piece — a check of the machinery, kept small, not a history of evidence.
    """
    manifest_path = find_manifest(paths)
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != 1:
        raise BundleError(f"{manifest_path}: unknown bundle format {manifest.get('format')!r}")
    base = manifest_path.parent
    archives = {}
    for name, meta in manifest.get("files", {}).items():
        path = next((p / name for p in paths if p.is_dir() and (p / name).is_file()), None)
        path = path or next((p for p in paths if p.name == name and p.is_file()), base / name)
        if not path.is_file():
            raise BundleError(f"{name} (listed in the manifest) is missing: fetch every file of the bundle")
        if path.stat().st_size != meta["bytes"] or sha256(path) != meta["sha256"]:
            raise BundleError(f"{name} does not match its size and SHA-256 in the manifest (damaged in transfer)")
        archives[name] = path
    dry = bool(manifest.get("dry_run"))
    target = results / "dry_run" if dry else results
    contents: dict[str, dict[str, bytes]] = {}
    for name, path in archives.items():
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if not member.isfile() or member.name.startswith("/") or ".." in parts or parts[0] not in PARTS:
                    raise BundleError(f"{name}: unexpected entry {member.name!r} (only files under {PARTS})")
                depth = 3 if parts[0] == "bench" else 2
                folder, rel = "/".join(parts[:depth]), "/".join(parts[depth:])
                contents.setdefault(folder, {})[rel] = tar.extractfile(member).read()
    added, same, replaced = [], [], []
    for folder, files in sorted(contents.items()):
        dest = target / folder
        if dest.exists() and not dry:
            existing = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
            if existing == files:
                same.append(folder)
                continue
            if not force:
                raise BundleError(f"{dest} is already in results/ with other content; pass --force to replace it")
            replaced.append(folder)
    if dry:
        for folder in contents:
            olders = _same_piece(target, folder)
            for older in olders:
                shutil.rmtree(older)
            if olders:
                replaced.append(folder)
        for old in (target / "windows").glob("*.json"):
            old.unlink()
    for folder, files in sorted(contents.items()):
        if folder in same:
            continue
        dest = target / folder
        if dest.exists():
            shutil.rmtree(dest)
        for rel, data in files.items():
            f = dest / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
        if folder not in replaced:
            added.append(folder)
    windows = target / "windows"
    windows.mkdir(parents=True, exist_ok=True)
    (windows / f"{manifest['window']}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return dict(target=target, added=added, replaced=replaced, unchanged=same, window=manifest["window"],
                dry_run=dry, dropped=manifest.get("dropped", []), complete=manifest.get("complete", True))  # fmt: skip


def _same_piece(target: Path, folder: str) -> list[Path]:
    """Committed folders of the same piece: ``runs/<name>``, or ``checks/<device>-*``, ``bench/<name>/<device>-*``
    under any source hash."""
    if folder.startswith("runs/"):
        return [target / folder] if (target / folder).exists() else []
    parent, leaf = folder.rsplit("/", 1)
    device = leaf.rsplit("-", 1)[0]
    return [p for p in (target / parent).glob(f"{device}-*") if p.is_dir() and p.name.rsplit("-", 1)[0] == device]


def read_text_tail(path: Path, limit: int = 64 * 1024) -> str:
    """The end of a text file (at most ``limit`` bytes), for output tails in result folders."""
    if not path.is_file():
        return ""
    data = path.read_bytes()
    if len(data) > limit:
        data = b"[...]\n" + data[-limit:]
    return data.decode("utf-8", errors="replace")


def xz_bytes(text: str) -> bytes:
    return lzma.compress(text.encode("utf-8"), preset=6)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False, default=str) + "\n").encode("utf-8")
