"""Read an offline wandb run file (``run-*.wandb``) back: what ``wandb sync`` would upload.

wandb 0.31 ships no Python reader. The file is a 7-byte header (``:W&B``, uint16 magic
0xBEE1, uint8 version) then LevelDB-log framing: 32 KiB blocks, each record a 7-byte
header (uint32 masked-free CRC-32, uint16 length, uint8 type 1 FULL / 2 FIRST / 3 MIDDLE /
4 LAST) and its payload; a block tail under 7 bytes is padding. Each whole payload is a
``wandb.proto.wandb_internal_pb2.Record``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path}: not a wandb run file"
    pos, parts = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero fill at the end of a file still being written
            break
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        parts = payload if kind in (FULL, FIRST) else parts + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def items(entries) -> dict:
    """``{key: value}`` of history/summary/config items; a ``nested_key`` path (media: an image's
    fields) becomes nested dicts under its first key."""
    out: dict = {}
    for item in entries:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def read_run(path: Path) -> dict:
    """The run record, config, history rows, summary updates, metric definitions and artifacts."""
    run = {"run": None, "config": {}, "history": [], "summary": {}, "metrics": [], "artifacts": []}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run["run"] = r.run
            run["config"].update(items(r.run.config.update))
        elif kind == "config":
            run["config"].update(items(r.config.update))
        elif kind == "history":
            run["history"].append(items(r.history.item))
        elif kind == "summary":
            run["summary"].update(items(r.summary.update))
        elif kind == "metric":
            run["metrics"].append(r.metric)
        elif kind == "artifact":
            run["artifacts"].append(r.artifact)
    return run
