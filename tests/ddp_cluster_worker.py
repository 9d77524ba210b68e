"""Two checks in one launch (tests/test_multinode.py): train.compile_after_prepare on every
process with a cheap dynamo backend, one training step, this rank's compile line and dynamo's
counters; and the validation samples gathered to the main process only (trackers.ValidationSamples).

    accelerate launch ... tests/ddp_cluster_worker.py OUT_DIR
"""
import functools
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState

from segtrain import hardware, trackers, train

# aot_eager: dynamo and AOTAutograd as with inductor, without compiling kernels (seconds on a CPU).
hardware.compile_model = functools.partial(hardware.compile_model, backend="aot_eager")
PartialState(cpu=True)
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 2, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
assert train.compile_after_prepare(model, accelerator)
loss = model(torch.randn(2, 3, 16, 16)).square().mean()
accelerator.backward(loss)
optimizer.step()
compiled, line = hardware.compile_outcome(accelerator.unwrap_model(model))
params = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
rank = int(os.environ.get("RANK", 0))
# Rank r sees val images "r0", "r1", "r2": the 3 smallest ids overall are rank 0's.
picker = trackers.ValidationSamples(3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_classes=2)
picker(torch.zeros(3, 3, 4, 4), torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), [f"{rank}{i}" for i in range(3)])
overlays = [p["id"] for p in picker.gather(accelerator).get("examples", [])]
(Path(sys.argv[1]) / f"cluster{rank}.json").write_text(json.dumps({
    "compiled": compiled, "line": line, "graphs": hardware.dynamo_counts()["graphs"],
    "world": accelerator.num_processes, "checksum": params.sum().item(), "overlays": overlays}))
# The process group ended before the interpreter's teardown (as train() does): a gloo thread
# still joinable while C++ destructors run aborts the process ("terminate called without an
# active exception", seen once in a loaded suite run).
accelerator.end_training()
