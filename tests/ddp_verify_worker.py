"""Run by tests/test_reliability.py under ``accelerate launch`` with 2 CPU processes (one machine).

Verifies a good and a damaged copy of the shards with ``integrity.verify_source`` (mode
always) and writes what this rank hashed, whether it wrote the cache, and the error it got.

    accelerate launch ... tests/ddp_verify_worker.py OUT GOOD_MANIFEST BAD_MANIFEST
"""
import json
import sys
from pathlib import Path

from accelerate import PartialState

from segtrain import integrity, sources
from segtrain.files import DataError

state = PartialState(cpu=True)
out, good, bad = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
hashed, writes = [], []
hash_and_count, write_cache = integrity.hash_and_count, integrity._write_cache
integrity.hash_and_count = lambda path: (hashed.append(str(path)), hash_and_count(path))[1]
integrity._write_cache = lambda *args: (writes.append(str(args[0])), write_cache(*args))[1]

integrity.verify_source(sources.resolve_data(good, "train"), "always")
try:
    integrity.verify_source(sources.resolve_data(bad, "train"), "always")
    error = None
except DataError as e:
    error = str(e)
(out / f"rank{state.process_index}.json").write_text(json.dumps({"hashed": hashed, "writes": writes, "error": error}))
# Leave together, with the group torn down: a rank that exits while the other's gloo threads
# still talk to it can abort the other ("terminate called without an active exception").
state.wait_for_everyone()
state.destroy_process_group()
