"""Resolves a training run's precision on every process, with a timing that differs by rank.

    accelerate launch ... tests/ddp_autotune_worker.py OUT_DIR

Rank 0's fake timing says bf16 is faster, rank 1's says fp32: if each rank measured for
itself they would disagree. Writes this rank's choice and whether it measured.
"""
import json
import os
import sys
from pathlib import Path

from accelerate import PartialState

from segtrain import autotune, hardware
from segtrain.config import parse_config

out_dir = Path(sys.argv[1])
rank = int(os.environ.get("RANK", 0))
measured = []
os.environ.pop(autotune.ENV_OFF, None)
os.environ["XDG_CACHE_HOME"] = str(out_dir / f"cache{rank}")  # no shared cache to agree through
hardware.cpu_bf16_native = lambda: (True, "AVX512")


def fake_measure(shape, mode, crop, batch, candidates, model=None):
    measured.append(1)
    fast = "bf16" if rank == 0 else "fp32"
    return {autotune.candidate_name(p, cl): [0.3 if p == fast else 0.6] for p, cl in candidates}


autotune.measure = fake_measure
state = PartialState(cpu=True)
runtime = autotune.training_runtime(parse_config(["--backbone", "resnet18", "--batch-size", "4"]), state)
(out_dir / f"rank{rank}.json").write_text(json.dumps({"runtime": runtime.to_dict(), "measured": len(measured),
                                                      "world": state.num_processes}))
state.wait_for_everyone()
