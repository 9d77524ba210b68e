"""Runs segtrain's training on every process, then writes this rank's parameter fingerprint.

    accelerate launch ... tests/ddp_train_worker.py OUT_DIR [train flags ...]
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from segtrain.config import parse_config
from segtrain.train import train

out_dir = Path(sys.argv[1])
result = train(parse_config(sys.argv[2:]))
params = torch.cat([p.detach().double().flatten() for p in result.model.state_dict().values()
                    if p.is_floating_point()])
# From the launcher's environment: train() ends by tearing down the process group.
rank = int(os.environ.get("RANK", 0))
(out_dir / f"rank{rank}.json").write_text(json.dumps({
    "sha256": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
    "sum": params.sum().item(),
    "world": int(os.environ.get("WORLD_SIZE", 1)),
}))
