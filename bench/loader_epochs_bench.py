"""Training loader workers started per epoch (what train() did before one loader served the whole
run) vs one endless loader, on a tiny dataset where the start-up dominates. Prints one line per trial.

    python bench/loader_epochs_bench.py

Measured (AMD EPYC Zen 4, 2 cores shared with other jobs, load ~9, torch 2.14.1): 12 images,
batch 4, crop 65, 2 workers, 10 epochs of 3 steps: per-epoch loaders 133-144 ms/step, one
endless loader 19-31 ms/step (the difference, ~0.35 s per epoch, is starting 2 workers).
"""
import itertools
import tempfile
import time
from pathlib import Path
import torch
from segtrain import loaders
from segtrain.sources import resolve_data
from segtrain.pack import pack_split
from segtrain.synthetic import generate
torch.set_num_threads(1)
tmp = Path(tempfile.mkdtemp())
root = generate(tmp / "voc", 12, 4, seed=0, min_size=64, max_size=128)
pack_split(root, "train", tmp / "shards", shard_size=4, progress=False)
data = resolve_data(tmp / "shards" / "voc-train.json", "train")
kw = dict(batch_size=4, crop_size=65, num_workers=2, seed=0, rank=0, world_size=1)
epochs = 10
for trial in range(2):
    t = time.perf_counter()
    for e in range(epochs):
        loader, steps = loaders.train_loader(data, epoch=e, **kw)
        for _ in loader:
            pass
    per_epoch = time.perf_counter() - t
    t = time.perf_counter()
    loader, steps = loaders.train_loader(data, epoch=0, endless=True, **kw)
    for _ in itertools.islice(loader, steps * epochs):
        pass
    endless = time.perf_counter() - t
    print(f"{epochs} epochs x {steps} steps, 2 workers: per-epoch loaders {per_epoch:.2f} s "
          f"({per_epoch / (steps * epochs) * 1000:.0f} ms/step), one endless loader {endless:.2f} s "
          f"({endless / (steps * epochs) * 1000:.0f} ms/step)")
