"""Trains under ``accelerate launch`` with rank 1's clock in another time zone, then writes what
this rank agreed on (run name and folder, weights) and what its own RNG draws next.

    accelerate launch ... tests/ddp_agree_worker.py OUT_DIR [train flags ...]
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

rank = int(os.environ.get("RANK", 0))
if rank == 1:  # five hours ahead: the default run name (with %H%M%S) differs from rank 0's
    os.environ["TZ"] = "UTC-5"
    time.tzset()

from segtrain.config import parse_config  # noqa: E402
from segtrain.train import train  # noqa: E402

out_dir = Path(sys.argv[1])
cfg = parse_config(sys.argv[2:])
result = train(cfg)
params = torch.cat([p.detach().double().flatten() for p in result.model.state_dict().values()
                    if p.is_floating_point()])
(out_dir / f"rank{rank}.json").write_text(json.dumps({
    "own_name": cfg.name, "run_dir": str(result.run_dir.resolve()),
    "sha256": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
    "next_draw": torch.rand(4).tolist(),  # the global RNG after training: dropout's
}))
