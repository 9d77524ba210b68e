"""Read an offline wandb run file (``run-*.wandb``) back: what ``wandb sync`` would upload.

The framing (a 7-byte ``:W&B`` header, then LevelDB-log records, each a
``wandb.proto.wandb_internal_pb2.Record``) is decoded by ``segtrain.trackers.wandb_records``,
which the wandb tracker also uses to find the last step an earlier attempt logged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from segtrain.trackers import wandb_records


def records(path: Path) -> Iterator:
    assert Path(path).read_bytes()[:4] == b":W&B", f"{path}: not a wandb run file"
    yield from wandb_records(path)


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
    """The run record, config, history rows, summary updates, metric definitions, artifacts, the
    exit code (None: the process ended without finishing the run) and whether it was marked preempting."""
    run = {"run": None, "config": {}, "history": [], "summary": {}, "metrics": [], "artifacts": [], "exit": None,
           "preempting": False}
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
        elif kind == "exit":
            run["exit"] = r.exit.exit_code
        elif kind == "preempting":
            run["preempting"] = True
    return run
