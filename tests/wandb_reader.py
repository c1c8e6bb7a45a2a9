"""Read back what wandb logged offline: the run-*.wandb file is a LevelDB-log-style stream of protobuf Records.

Layout (wandb's datastore): a 7-byte file header, then 32 KiB blocks of records, each with a 7-byte header —
crc32 (4 bytes), payload length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last fragment). A block
tail shorter than a record header is padding. wandb 0.31 ships no Python reader, only the protobuf classes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
FILE_HEADER = 7
RECORD_HEADER = 7


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    out, pos, pending = [], FILE_HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:
            pos += left_in_block  # padding at the end of a block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        payload = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            pending += payload
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")
        rec = pb.Record()
        rec.ParseFromString(pending)
        out.append(rec)
        pending = b""
    return out


def history(path: Path) -> list[dict]:
    """The rows passed to ``run.log``, as {key: value} (JSON-decoded), in order."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_file(directory: Path) -> Path:
    files = sorted(Path(directory).rglob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {directory}, found {files}")
    return files[0]
