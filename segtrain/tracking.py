"""Experiment tracking with wandb: what a training run (and an evaluation) sends to the dashboard.

train.py calls this module in a few one-line calls; everything wandb-specific lives here:

* ``init_kwargs``/``wandb_mode``: online when wandb's own credential lookup finds a key for
  the host wandb is configured for (``WANDB_API_KEY``, ``~/.netrc`` or the settings file
  ``wandb login --host`` writes, so self-hosted servers count), offline otherwise;
  ``WANDB_MODE`` decides when set. The key is never read into segtrain's records.
* ``shared_run_id``: the wandb run id, decided by the main process, written once per launch to
  ``RUN_DIR/wandb_id`` and broadcast to every rank (ranks used to race to write it).
* ``dashboard_config``: the config as users filter the runs table (resolved precision at the
  top level, processes, per-process batch, steps/epoch, dataset and image counts, only the
  options of the losses used).
* ``start``: ``define_metric`` (charts against the optimizer step ``step``), and, on a resume,
  a NEW wandb run in the same group that records which run and step it resumes and replays
  ``metrics.jsonl`` up to the checkpoint (see ``start`` for why not wandb's rewind).
* ``log_validation``: per-class IoU/accuracy scalars ``val/iou/<class>``/``val/acc/<class>``,
  the per-class table, the best-so-far summary ``best/val_miou``/``best/step``, and mask
  overlays of a fixed set of validation images (``OverlayPicker``), one key per image.
* ``finish``: ``final/*`` summary and, with ``--log-model``, best.pt/final.pt as model artifacts.
* ``log_evaluation``: segtrain.evaluate's results into the training's own wandb run.
* ``say_how_to_sync``: every offline folder of the run, oldest first.
"""
from __future__ import annotations

import dataclasses
import math
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from segtrain import distributed
from segtrain.checkpoints import RunDir, read_metrics_log
from segtrain.files import PathLike, atomic_write_bytes
from segtrain.transforms import denormalize

if TYPE_CHECKING:
    from accelerate import Accelerator

    from segtrain.plan import RunPlan

# --log-model: which checkpoint becomes a wandb model artifact, logged once when training ends.
LOG_MODEL = {
    "none": "no artifact: best.pt/final.pt stay in RUN_DIR only",
    "best": "best.pt as a model artifact (metrics in its metadata)",
    "final": "best.pt and final.pt as model artifacts",
}
# none by default: offline (segtrain's default without credentials) an artifact is staged and
# later uploaded as a second copy of weights that RUN_DIR already holds (~100-300 MB a run).
DEFAULT_LOG_MODEL = "none"
GROUP_HELP = "wandb run group (e.g. one study); a resumed run stays in its group; default: WANDB_RUN_GROUP or none"
TAGS_HELP = "wandb tags, comma-separated (e.g. voc,r50)"
NOTES_HELP = "wandb notes: a sentence on what this run tries"
STEP_KEY = "step"  # every wandb row carries the optimizer step under this key: the charts' x axis


# ----------------------------------------------------------------------------- online or offline

def wandb_mode() -> Optional[str]:
    """``"offline"`` when wandb would find no credentials, else None (wandb decides: WANDB_MODE,
    the settings file's mode, online).

    Asks wandb itself: its settings (``WANDB_BASE_URL``, the settings files ``wandb login
    --host`` writes) name the server, and its credential lookup (``WANDB_API_KEY``, an identity
    token, ``~/.netrc`` for that host, the settings' api_key) says whether it can log in, so a
    self-hosted server is not forced offline. Failing an unreachable login costs minutes.
    """
    if "WANDB_MODE" in os.environ:
        return None
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        if settings.mode in ("offline", "dryrun", "disabled"):
            return None  # `wandb offline` / `wandb disabled`: wandb does as told
        found = (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
                 or wbauth.read_netrc_auth(host=settings.base_url) or settings.api_key)
    except Exception:  # a malformed netrc/settings file: wandb itself would fail to log in
        found = None
    return None if found else "offline"


# ----------------------------------------------------------------------------- the run id

def shared_run_id(accelerator: "Accelerator", run_dir: PathLike, resuming: bool) -> tuple[str, Optional[str]]:
    """``(id, previous id)``: the main process decides, writes ``RUN_DIR/wandb_id`` once, and
    every rank gets the same answer (a collective, so call it on every rank).

    A fresh run gets a new id (never merged into an older run of the same --name); a resumed
    one gets a new id too, and the one it resumes (see ``start``).
    """
    def decide() -> tuple[str, Optional[str]]:
        id_file = RunDir(run_dir).wandb_id
        previous = id_file.read_text().strip() if resuming and id_file.is_file() else None
        run_id = uuid.uuid4().hex[:16]
        atomic_write_bytes(id_file, run_id.encode())
        return run_id, previous

    return distributed.decided_by_main(decide, accelerator.state)


# ----------------------------------------------------------------------------- config

def loss_options_used(loss: str) -> set[str]:
    """The config's loss options that the losses of ``loss`` (e.g. ``ce+0.5*dice``) read."""
    from segtrain.losses import LOSSES, parse_loss_spec

    return {option for _, name in parse_loss_spec(loss) for option in LOSSES[name].options}


def dashboard_config(plan: "RunPlan") -> dict[str, Any]:
    """The run's config as users filter and group the runs table by it."""
    from segtrain.losses import LOSS_OPTIONS

    cfg = plan.cfg
    used = loss_options_used(cfg.loss)
    config = {k: v for k, v in dataclasses.asdict(cfg).items()
              if (k not in LOSS_OPTIONS or k in used) and k != "resume"}
    config.update(
        mixed_precision=plan.runtime.mixed_precision,  # what ran, not "auto"
        mixed_precision_requested=cfg.mixed_precision, processes=plan.world_size,
        per_process_batch=plan.per_process_batch, steps_per_epoch=plan.steps_per_epoch,
        dataset=plan.spec.name, train_images=plan.train_source.num_samples, val_images=plan.val_source.num_samples,
        data_name=Path(cfg.data).name, resolved=plan.runtime.to_dict())
    return config


# ----------------------------------------------------------------------------- the training's run

def init_kwargs(plan: "RunPlan", run_id: str, previous: Optional[str]) -> dict:
    """``wandb.init`` arguments (through Accelerate's tracker) for this launch."""
    cfg = plan.cfg
    tags = [t.strip() for t in (cfg.tags or "").split(",") if t.strip()]
    kwargs = {"dir": str(plan.run_dir), "name": cfg.name, "id": run_id, "resume": "allow",
              "tags": tags + (["resumed"] if previous else []) or None, "notes": cfg.notes,
              "group": cfg.group or os.environ.get("WANDB_RUN_GROUP"), "job_type": "train"}
    mode = wandb_mode()
    if mode:
        kwargs["mode"] = mode
    return {"wandb": {k: v for k, v in kwargs.items() if v is not None}}


def start(accelerator: "Accelerator", plan: "RunPlan", step: int) -> None:
    """Open the wandb run (main process; every rank must call: the id is a collective).

    A resume opens a NEW run (same name, group and config, ``resumed_from = {run_id, step}``,
    tag ``resumed``) and replays ``metrics.jsonl``, already cut back to the checkpoint, into
    it: that run alone holds one consistent history (steps up to the checkpoint from the log,
    the later ones from the resumed training) and best/final summaries from the training that
    wrote best.pt. Why not reuse the id: wandb ignores steps lower than a run's current one
    (the resumed steps would be dropped, the abandoned ones kept). Why not wandb's rewind
    (``resume_from="id?_step=N"``, tried offline with wandb 0.31): offline it only records a
    branch point in the run record for the server to apply at sync, and wandb documents rewind
    as a private preview that self-hosted servers lack, so the history would depend on the
    server. The crashed attempt stays in the group, without ``final/*``.
    """
    if plan.cfg.tracker != "wandb":
        return
    run_id, previous = shared_run_id(accelerator, plan.run_dir, plan.resume_from is not None)
    config = dashboard_config(plan) | ({"resumed_from": {"run_id": previous, "step": step}} if previous else {})
    accelerator.init_trackers(plan.cfg.wandb_project, config=config,
                              init_kwargs=init_kwargs(plan, run_id, previous))
    if not accelerator.is_main_process:
        return
    run = accelerator.get_tracker("wandb", unwrap=True)
    run.define_metric(STEP_KEY, hidden=True)
    run.define_metric("*", step_metric=STEP_KEY)
    metrics_path = plan.run_dir.metrics  # absent when the checkpoint came before the first log line
    if step > 0 and metrics_path.is_file():
        replay(run, read_metrics_log(metrics_path), plan.spec.classes)


def replay(run: Any, records: list[dict], class_names: tuple[str, ...]) -> None:
    """Log the records of metrics.jsonl (the steps before a resume) as the training logged them."""
    for record in records:
        row = {k: v for k, v in record.items() if not isinstance(v, list)}
        if "val/miou" in record:
            row |= class_scalars(record.get("val/iou"), record.get("val/class_acc"), class_names)
            update_best(run, record["val/miou"], record["step"])
        run.log(row, step=record["step"])


def class_scalars(iou: Optional[list], acc: Optional[list], class_names: tuple[str, ...]) -> dict[str, float]:
    """``val/iou/<class>`` and ``val/acc/<class>``; classes absent from the split (NaN) are left out."""
    out = {}
    for prefix, values in (("val/iou", iou), ("val/acc", acc)):
        for name, value in zip(class_names, values or ()):
            if value is not None and not math.isnan(value):
                out[f"{prefix}/{name}"] = float(value)
    return out


def update_best(run: Any, miou: float, step: int) -> None:
    """``best/val_miou`` and ``best/step``: the same rule as best.pt (strictly better)."""
    if miou > run.summary.get("best/val_miou", -1.0):
        run.summary["best/val_miou"] = miou
        run.summary["best/step"] = step


class OverlayPicker:
    """``evaluate``'s ``on_batch``: keeps the ``count`` validation images with the smallest ids
    that this rank sees; ``gather`` merges the ranks' picks. The smallest ids of the whole split
    are the same whatever the process count, worker count or order, so every run of a study
    shows the same images."""

    def __init__(self, count: int, mean: Any, std: Any) -> None:
        self.count, self.mean, self.std = count, mean, std
        self.kept: dict[str, dict] = {}

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor, ids: list) -> None:
        if self.count == 0:
            return
        for i, sample_id in enumerate(map(str, ids)):
            if len(self.kept) < self.count or sample_id < max(self.kept):
                self.kept[sample_id] = {"id": sample_id, "image": denormalize(images[i], self.mean, self.std),
                                        "mask": masks[i].cpu().numpy().astype(np.uint8),
                                        "pred": preds[i].cpu().numpy().astype(np.uint8)}
                if len(self.kept) > self.count:
                    del self.kept[max(self.kept)]

    def gather(self, accelerator: "Accelerator") -> list[dict]:
        """Every rank's picks, merged: the ``count`` smallest ids overall (a collective)."""
        picks = list(self.kept.values())
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object
            picks = gather_object(picks)
        return sorted(picks, key=lambda p: p["id"])[:self.count]


def log_validation(accelerator: "Accelerator", plan: "RunPlan", step: int, metrics: dict,
                   picker: OverlayPicker) -> None:
    """Per-class scalars, the per-class table, the best summary and the overlays (call on every
    rank after a validation: gathering the overlays is a collective)."""
    if plan.cfg.tracker != "wandb":
        return
    examples = picker.gather(accelerator)
    if not accelerator.is_main_process:
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    names = plan.spec.classes
    labels = {i: name for i, name in enumerate(names)} | {255: "ignore"}
    table = wandb.Table(columns=["class", "iou", "acc"], data=[
        [n, None if math.isnan(i) else i, None if math.isnan(a) else a]
        for n, i, a in zip(names, metrics["iou"], metrics["class_acc"])])
    # One key per image: images of different sizes in one list make wandb warn and draw them wrongly.
    overlays = {f"val/overlay/{ex['id']}": wandb.Image(ex["image"], caption=ex["id"], masks={
        "predictions": {"mask_data": ex["pred"], "class_labels": labels},
        "ground_truth": {"mask_data": ex["mask"], "class_labels": labels}}) for ex in examples}
    update_best(run, metrics["miou"], step)
    run.log({STEP_KEY: step, "val/per_class": table, **overlays,
             **class_scalars(metrics["iou"], metrics["class_acc"], names)}, step=step)


def finish(accelerator: "Accelerator", plan: "RunPlan", step: int, metrics: dict) -> None:
    """``final/*`` summary and the model artifacts (main process; before ``end_training``)."""
    if plan.cfg.tracker != "wandb" or not accelerator.is_main_process:
        return
    run = accelerator.get_tracker("wandb", unwrap=True)
    if metrics:
        run.summary.update({"final/val_miou": metrics["miou"], "final/val_pixel_acc": metrics["pixel_acc"],
                            "final/step": step})
    names = {"none": [], "best": ["best"], "final": ["best", "final"]}[plan.cfg.log_model]
    for name in names:
        log_model_artifact(run, plan.run_dir.model_file(name))


def log_model_artifact(run: Any, path: Path) -> None:
    """``path`` as a model artifact ``<run id>-<best|final>``, its metrics and step in the metadata."""
    import wandb

    if not path.is_file():
        return
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    metadata = {"step": ckpt.get("step"), **{k: v for k, v in (ckpt.get("metrics") or {}).items()
                                             if not isinstance(v, list)},
                "arch": ckpt["config"].get("arch"), "backbone": ckpt["config"].get("backbone")}
    artifact = wandb.Artifact(f"model-{run.id}-{path.stem}", type="model", metadata=metadata)
    # immutable: wandb uploads the file where it is instead of staging a copy of the weights
    # (~45 MB for a ResNet-18 DeepLabV3+) under ~/.local/share/wandb until it is synced.
    artifact.add_file(str(path), name=path.name, policy="immutable")
    run.log_artifact(artifact, aliases=[path.stem, "latest"])


def say_how_to_sync(accelerator: "Accelerator", plan: "RunPlan") -> None:
    """Name every offline folder of the run, oldest first (a resumed run has one per launch)."""
    if not accelerator.is_main_process or plan.cfg.tracker != "wandb":
        return
    offline = offline_folders(plan.run_dir)
    if offline:
        accelerator.print("wandb ran offline; upload this run (every launch, oldest first) with:  wandb sync "
                          + " ".join(str(p) for p in offline))


def offline_folders(run_dir: PathLike) -> list[Path]:
    """``RUN_DIR/wandb/offline-run-<YYYYMMDD_HHMMSS>-<id>`` folders in the order they were written."""
    return sorted(RunDir(run_dir).wandb.glob("offline-run-*"), key=lambda p: (p.stat().st_mtime, p.name))


# ----------------------------------------------------------------------------- evaluation results

def log_evaluation(run_dir: RunDir, result: dict) -> Optional[str]:
    """Add segtrain.evaluate's ``result`` to the summary of the training's wandb run (the id in
    ``RUN_DIR/wandb_id``), as ``eval/<split>/<protocol>/<metric>``, so final, best and ms-flip
    mIoU sit in one row of the runs table. Returns the run id, or None when RUN_DIR has none."""
    import yaml

    id_file = run_dir.wandb_id
    if not id_file.is_file():
        return None
    saved = yaml.safe_load(run_dir.config.read_text()) if run_dir.config.is_file() else {}
    import wandb

    prefix = f"eval/{result['split']}/{result['protocol']}"
    summary = {f"{prefix}/{k}": result[k] for k in ("miou", "pixel_acc", "mean_class_acc", "fwiou", "num_images")
               if k in result}
    summary |= {f"{prefix}/iou/{name}": v for name, v in zip(result.get("class_names", ()), result.get("iou", ()))
                if v is not None and not (isinstance(v, float) and math.isnan(v))}
    summary[f"{prefix}/checkpoint"] = Path(result["checkpoint"]).name
    mode = wandb_mode()
    run = wandb.init(project=(saved or {}).get("wandb_project", "segtrain"), id=id_file.read_text().strip(),
                     resume="allow", dir=str(run_dir), **({"mode": mode} if mode else {}))
    run.summary.update(summary)
    run.finish()
    return run.id


__all__ = ["LOG_MODEL", "DEFAULT_LOG_MODEL", "GROUP_HELP", "TAGS_HELP", "NOTES_HELP", "wandb_mode",
           "shared_run_id", "dashboard_config", "start", "OverlayPicker", "log_validation", "finish",
           "say_how_to_sync", "offline_folders", "log_evaluation"]
