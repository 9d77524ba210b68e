"""No host-device synchronisation in a training step that does not log (issue 17, item 6).

A CUDA device runs ahead of the Python process as long as nothing asks it for a value.
The ops below make the host wait for the device (or the device for the host); run under a
``TorchDispatchMode`` they are visible on a CPU too (/work/shared/FIELD_NOTES.md, "Host-device
syncs, seen from a CPU"):

* ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``if t:``), ``aten.item``,
  ``aten.is_nonzero``, ``aten.equal``: a device value read on the host;
* ``aten.nonzero``, ``aten.masked_select``, ``aten.unique*``, and ``aten.index`` /
  ``aten.index_put`` with a boolean index (``x[mask]``: its nonzero runs inside the kernel):
  outputs whose shape depends on the data, so the host waits to learn it;
* ``aten.lift_fresh``: a tensor built from a Python list or a numpy array; on a GPU it is
  followed by a host-to-device copy (``torch.as_tensor(list, device=cuda)``).

Not visible on a CPU, checked by reading instead: a module left on the CPU whose buffers are
copied to the GPU each call (``.to(device)`` is a no-op on a CPU run): the training loop moves
the loss to the device once (``criterion.to(accelerator.device)`` in build_training; the
losses' remaining ``.to(logits.device)`` are no-ops then), and the normalisation tensors are
made once before the loop (``normalization_tensors``). On a GPU, ``bench/gpu_check`` runs
training steps under ``torch.cuda.set_sync_debug_mode("error")``, which catches all of them.

Named exception, not counted here: with ``--mixed-precision fp16`` (T4, V100) Accelerate's
GradScaler reads whether the gradients hold an inf/NaN once per optimizer step
(``GradScaler.step`` -> ``found_inf.item()``): loss scaling cannot skip a step without that
read. fp16 does not run on a CPU (Accelerate ignores it), so this test cannot count it; bf16
and fp32 have no scaler and no such read.
"""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import segtrain.train as train_module
from segtrain.config import parse_config

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero,
            aten.masked_select, aten.lift_fresh}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def bool_indexed(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """Counts the ops that force a host-device sync on CUDA, per training step (``self.step``,
    set by the patched lr_factor that the loop calls at the start of every step)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = "setup"
        self.paused = False
        self.seen: dict = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            packet = func.overloadpacket
            name = str(packet).removeprefix("aten.")
            if (packet in SYNC_OPS or name.startswith(("unique", "_unique"))
                    or (packet in INDEX_OPS and bool_indexed(args))):
                frames = [f for f in traceback.extract_stack() if "/segtrain/" in f.filename]
                where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
                self.seen[self.step][f"{func} at {where}"] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


class Stop(Exception):
    """Ends train() at the start of a step: the steps before it are all the test needs."""


def count_syncs_per_step(monkeypatch, cfg, stop_at=None) -> dict:
    """{step: Counter of sync ops} of train(cfg), setup ops under "setup"; with ``stop_at``,
    train() is stopped when step ``stop_at`` starts (no validation or checkpoint: faster)."""
    counter = SyncCounter()
    real_lr_factor, real_batches = train_module.lr_factor, train_module.micro_batches

    def lr_factor(step, cfg):
        if step == stop_at:
            raise Stop
        counter.step = step
        return real_lr_factor(step, cfg)

    def micro_batches(*args, **kwargs):
        # The loader runs on the host (CPU tensors, numpy): not part of the device step.
        inner = real_batches(*args, **kwargs)
        try:
            while True:
                with counter.pause():
                    batch = next(inner)
                yield batch
        finally:
            inner.close()

    monkeypatch.setattr(train_module, "lr_factor", lr_factor)
    monkeypatch.setattr(train_module, "micro_batches", micro_batches)
    with counter, contextlib.suppress(Stop):
        train_module.train(cfg)
    return counter.seen


def train_config(data, run_dir, loss, *extra, iterations=100):
    # --log-every etc. = iterations: the steps counted neither log, validate nor checkpoint.
    return parse_config(["--data", str(data), "--run-dir", str(run_dir), "--backbone", "resnet18",
                         "--pretrained", "false", "--crop-size", "33", "--batch-size", "4", "--workers", "0",
                         "--tracker", "none", "--mixed-precision", "no", "--iterations", str(iterations),
                         "--log-every", str(iterations), "--val-every", str(iterations),
                         "--checkpoint-every", str(iterations), "--loss", loss, *extra])


EVERY_LOSS = "ce+weighted_ce+focal+dice+lovasz+ohem"


def test_no_sync_in_a_training_step_that_does_not_log(packed_shards, tmp_path, monkeypatch):
    """Every loss in one step (as bench/gpu_check's syncs section does): a sync in any of them is
    counted, named by its op, file and line, with one training instead of one per loss."""
    seen = count_syncs_per_step(monkeypatch, train_config(packed_shards["train"], tmp_path / "run", EVERY_LOSS),
                                stop_at=2)
    assert set(seen) <= {"setup", 0, 1}
    assert {step: dict(seen[step]) for step in (0, 1) if seen[step]} == {}


def test_no_sync_with_a_sum_aux_head_accumulation_and_clipping_until_the_logging_step(packed_shards, tmp_path,
                                                                                       monkeypatch):
    """The rest of the step's code path, to the end of a run; the last step logs and validates."""
    cfg = train_config(packed_shards["train"], tmp_path / "run", "ce+0.5*dice", "--aux-loss-weight", "0.4",
                       "--grad-accum", "2", "--grad-clip", "1.0", iterations=3)
    seen = count_syncs_per_step(monkeypatch, cfg)
    assert {step: dict(seen[step]) for step in (0, 1) if seen[step]} == {}
    # The counter sees syncs where they are expected: the logging step reads the loss (.item()).
    assert any("_local_scalar_dense" in op for op in seen[2])


def test_the_counter_sees_what_the_old_code_did(monkeypatch):
    """Guards the guard: the formulations this issue removed are counted."""
    counter = SyncCounter()
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    with counter:
        valid = target != 255
        logits.permute(0, 2, 3, 1)[valid]                      # boolean-mask indexing (old dice/lovasz)
        torch.as_tensor([0.485, 0.456, 0.406])                 # mean from a list (old normalize)
        valid.sum().item()                                     # a value read on the host
        torch.nonzero(valid)
    ops = {op.split(" at ")[0] for op in counter.seen["setup"]}
    assert ops == {"aten.index.Tensor", "aten.lift_fresh.default", "aten._local_scalar_dense.default",
                   "aten.nonzero.default"}
