"""Experiment trackers: what a training run (and an evaluation) sends to a dashboard.

The train loop calls one interface, ``Tracker``, and never asks which tracker it has:

* ``start(step)``: open the run (a resume continues the job's own run and first sends what the
  dashboard missed, from ``metrics.jsonl``, the record);
* ``log(record)``: one metrics.jsonl record (train loss, lr, throughput, validation scalars);
* ``log_validation(step, metrics, samples)``: what a validation shows beyond its scalars
  (per-class scalars and table, best-so-far, per-image table, mask overlays);
* ``log_checkpoint(path, step)``: best.pt was written (``--log-model``);
* ``finish(step, metrics, exit_code)``: final summary; a nonzero code (a stop signal) leaves
  the run marked preempted, not finished.

``TRACKERS`` names the choices (``--tracker``): ``wandb`` (``WandbTracker``), ``jsonl``,
``none`` and Accelerate's trackers by name (``tensorboard``, ``mlflow``, ...:
``AccelerateTracker``). ``log_evaluation`` adds ``segtrain.evaluate``'s results to the
training's run (``evaluate --tracker``).

A tracker never ends a training. On a cluster the job's signal also reaches the tracker's
helper process (wandb's ``wandb-core`` exits at once, wandb/wandb#9963), so the next call
raises ``ConnectionResetError``/``BrokenPipeError``: any exception from a tracker call is
warned about once, and that tracker is skipped for the rest of the launch. The stop still
checkpoints and exits 75; what the dashboard missed reaches it at the next resume
(``WandbTracker.start`` replays metrics.jsonl from the last step the run already has).

Every method is called on every rank and acts on the main process only; none is a
collective (gathering the validation samples is, and is done by the caller:
``ValidationSamples.gather``), so a tracker failing on rank 0 cannot desynchronise ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import struct
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from segtrain.checkpoints import RunDir, read_metrics_log
from segtrain.files import PathLike, atomic_write_bytes
from segtrain.transforms import denormalize

if TYPE_CHECKING:
    import wandb
    from accelerate import Accelerator

    from segtrain.sources import DataSource

# A segtrain.plan.RunPlan (not imported, even for type checking: plan -> config -> trackers would be a cycle).
RunPlan = Any

# Accelerate's trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS), named here so that reading the
# choices does not import Accelerate; each needs its own package installed.
ACCELERATE_TRACKERS = {
    "tensorboard": "TensorBoard event files in RUN_DIR/tensorboard (Accelerate's tracker; pip install tensorboard)",
    "mlflow": "Accelerate's MLflow tracker (pip install mlflow)",
    "comet_ml": "Accelerate's Comet tracker (pip install comet_ml)",
    "aim": "Accelerate's Aim tracker, logging to RUN_DIR (pip install aim)",
    "clearml": "Accelerate's ClearML tracker (pip install clearml)",
    "dvclive": "Accelerate's DVCLive tracker (pip install dvclive)",
    "swanlab": "Accelerate's SwanLab tracker (pip install swanlab)",
    "trackio": "Accelerate's Trackio tracker (pip install trackio)",
}
TRACKERS = {
    "wandb": "Weights & Biases: one run per job across resumes (offline without credentials)",
    "jsonl": "JSON lines in RUN_DIR/tracker.jsonl: what a dashboard would get, per-image rows included",
    **ACCELERATE_TRACKERS,
    "none": "no tracker (RUN_DIR/metrics.jsonl is written whatever the tracker)",
}
DEFAULT_TRACKER = "wandb"
TRACKER_HELP = "experiment tracker"
# --log-model: which checkpoints become wandb model artifacts.
LOG_MODEL = {
    "none": "no artifact: best.pt/final.pt stay in RUN_DIR only",
    "best": "best.pt each time it improves, as versions of one model artifact (aliases best, latest)",
    "final": "as best, plus final.pt at the end (alias final)",
}
# none by default: each version is a copy of weights that RUN_DIR already holds (~45-160 MB).
DEFAULT_LOG_MODEL = "none"
GROUP_HELP = "wandb run group (e.g. one study); a resumed run stays in its group; default: WANDB_RUN_GROUP or none"
TAGS_HELP = "wandb tags, comma-separated (e.g. voc,r50)"
NOTES_HELP = "wandb notes: a sentence on what this run tries"
STEP_KEY = "step"  # every row carries the optimizer step under this key: the charts' x axis
IMAGES_KEY = "images_seen"  # step x global batch: the x axis on which runs with other GPU counts line up


# ----------------------------------------------------------------------------- the interface

class Tracker:
    """The interface, and the ``none`` tracker (every method does nothing).

    Subclasses implement the ``_start``/``_log``/``_log_validation``/``_log_checkpoint``/
    ``_finish`` hooks; the public methods run them on the main process only, and turn any
    exception into one warning after which this tracker is skipped (module doc).
    """

    name = "none"
    # Whether log_validation uses ValidationSamples (a class attribute, the same on every rank:
    # the caller gathers the samples in a collective).
    wants_samples = False

    def __init__(self, plan: RunPlan, main: bool) -> None:
        self.plan, self.main, self.failed = plan, main, False

    def start(self, step: int) -> None:
        """Open the run for training from ``step`` (0, or the resumed checkpoint's)."""
        self._safely(self._start, step)

    def log(self, record: dict) -> None:
        """One record of metrics.jsonl (with its ``step``), lists left out."""
        self._safely(self._log, {k: v for k, v in record.items() if not isinstance(v, list)})

    def log_validation(self, step: int, metrics: dict, samples: Optional[dict]) -> None:
        """After a validation's ``log``: per-class results, best so far, ``samples`` (gathered)."""
        self._safely(self._log_validation, step, metrics, samples or {})

    def log_checkpoint(self, path: Path, step: int) -> None:
        """``path`` (best.pt) was just written at ``step``."""
        self._safely(self._log_checkpoint, path, step)

    def finish(self, step: int, metrics: dict, exit_code: int = 0) -> None:
        """End the run: ``exit_code`` 0 when training completed, else the process's exit status."""
        self._safely(self._finish, step, metrics, exit_code)
        if self.main:
            self._closing_words(exit_code)

    def samples(self, count: int, mean: Any, std: Any) -> Optional["ValidationSamples"]:
        """The validation's ``on_batch`` collector this tracker uses (None: nothing to collect)."""
        return ValidationSamples(count, mean, std, self.plan.cfg.num_classes) if self.wants_samples else None

    def _safely(self, call: Any, *args: Any) -> None:
        if not self.main or self.failed:
            return
        try:
            call(*args)
        except Exception as e:  # noqa: BLE001 -- whatever a tracker raises, training goes on
            self.failed = True
            warnings.warn(f"tracker {self.name} failed ({type(e).__name__}: {e}); it is skipped for the rest of "
                          f"this launch, training goes on. metrics.jsonl keeps the record; a resume sends the "
                          f"dashboard what it missed", RuntimeWarning, stacklevel=3)
            with contextlib.suppress(Exception):
                self._abandon()

    def _start(self, step: int) -> None: ...
    def _log(self, row: dict) -> None: ...
    def _log_validation(self, step: int, metrics: dict, samples: dict) -> None: ...
    def _log_checkpoint(self, path: Path, step: int) -> None: ...
    def _finish(self, step: int, metrics: dict, exit_code: int) -> None: ...
    def _closing_words(self, exit_code: int) -> None: ...
    def _abandon(self) -> None:
        """After a failure: release what the backend holds, quietly (it may be dead)."""


def open_tracker(plan: RunPlan, main: bool) -> Tracker:
    """The tracker ``plan.cfg.tracker`` names (call on every rank; ``main``: this is the main process)."""
    name = plan.cfg.tracker
    if name in ACCELERATE_TRACKERS:
        return AccelerateTracker(plan, main, name)
    return {"wandb": WandbTracker, "jsonl": JsonlTracker, "none": Tracker}[name](plan, main)


def log_evaluation(name: str, run_dir: RunDir, result: dict) -> Optional[str]:
    """Add segtrain.evaluate's ``result`` to the training's run in tracker ``name``; returns where
    it went (the wandb run id, a file or folder), or None when RUN_DIR has no such run."""
    summary = evaluation_summary(result)
    if name == "wandb":
        return wandb_log_evaluation(run_dir, summary)
    if name == "jsonl":
        append_line(run_dir.tracker_jsonl, {"event": "evaluation", **summary})
        return str(run_dir.tracker_jsonl)
    if name in ACCELERATE_TRACKERS:
        return accelerate_log_evaluation(name, run_dir, summary, result)
    return None


def evaluation_summary(result: dict) -> dict[str, Any]:
    """``eval/<split>/<protocol>/<metric>`` keys of an evaluation result (per-class IoU by name)."""
    prefix = f"eval/{result['split']}/{result['protocol']}"
    summary = {f"{prefix}/{k}": result[k] for k in ("miou", "pixel_acc", "mean_class_acc", "fwiou", "num_images")
               if k in result}
    summary |= {f"{prefix}/iou/{name}": v for name, v in zip(result.get("class_names", ()), result.get("iou", ()))
                if v is not None and not (isinstance(v, float) and math.isnan(v))}
    summary[f"{prefix}/checkpoint"] = Path(result["checkpoint"]).name
    return summary


# ----------------------------------------------------------------------------- what every tracker shows

def class_scalars(iou: Optional[list], acc: Optional[list], class_names: tuple[str, ...]) -> dict[str, float]:
    """``val/iou/<class>`` and ``val/acc/<class>``; classes absent from the split (NaN) are left out."""
    out = {}
    for prefix, values in (("val/iou", iou), ("val/acc", acc)):
        for name, value in zip(class_names, values or ()):
            if value is not None and not math.isnan(value):
                out[f"{prefix}/{name}"] = float(value)
    return out


def flat_config(plan: RunPlan) -> dict[str, Any]:
    """The run's config as users compare runs: top-level scalars only.

    No machine-local paths (the data and weights by file name), no nested timing tables, no
    group/tags/notes (the run has them). Each loss's weight is a number under its flag's name
    (``dice_weight``, 0 when the loss is not in the mix: the config resolves them), the key a
    sweep varies and a parallel-coordinates panel plots, next to the normalised ``loss``.
    """
    from segtrain.losses import LOSS_OPTIONS

    cfg = plan.cfg
    used = loss_options_used(cfg.loss)
    skip = {"resume", "run_dir", "group", "tags", "notes", "data", "val_data", "init_from", "backbone_weights"}
    config = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in skip and (k not in LOSS_OPTIONS or k in used)}
    config |= {f"{k}_name": Path(getattr(cfg, k)).name for k in ("data", "val_data", "init_from", "backbone_weights")
               if getattr(cfg, k)}
    runtime = plan.runtime.to_dict()
    config |= {"mixed_precision": runtime.get("mixed_precision"), "mixed_precision_requested": cfg.mixed_precision,
               "precision_reason": runtime.get("precision_reason"), "device": runtime.get("device"),
               "processes": plan.world_size, "per_process_batch": plan.per_process_batch,
               "steps_per_epoch": plan.steps_per_epoch, "dataset": plan.spec.name, **_split_sizes(plan)}
    return config


def _loss_options(name: str) -> tuple[str, ...]:
    from segtrain.losses import LOSSES

    return tuple(LOSSES[name].options)


def loss_options_used(loss: str) -> set[str]:
    """The config's loss options that the losses of ``loss`` (e.g. ``ce+0.5*dice``) read."""
    from segtrain.losses import parse_loss_spec

    return {option for _, name in parse_loss_spec(loss) for option in _loss_options(name)}


def _split_sizes(plan: RunPlan) -> dict[str, Any]:
    """Image counts of the train and val splits as the plan's data sources know them, and the
    train manifest's sha256 ("same data?" is one filter, whatever the path on each machine)."""
    train, val = plan.train_source, plan.val_source
    sizes = {"train_images": train.num_samples, "val_images": val.num_samples}
    if train.manifest is not None:
        sizes["data_sha256"] = manifest_sha256(train.manifest)
    return sizes


def manifest_sha256(manifest: dict) -> str:
    """A manifest's content hash, whatever file, URL or key order it was read from."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def dataset_artifact(source: DataSource) -> Optional["wandb.Artifact"]:
    """The data of ``source`` as a wandb dataset artifact ``data-<manifest name>``, or None for data
    without a manifest (a bare shard pattern, a VOC folder).

    Its manifest is a file entry (a local manifest's file; a remote one's content as read), every
    remote shard a reference entry (``checksum=False``: nothing is downloaded, the manifest holds
    each shard's sha256); local shards are not copied, the manifest stands for them. The metadata
    carries ``sha256``, the config's ``data_sha256``.
    """
    import wandb

    if source.manifest is None:
        return None
    names = re.findall(r"[^/\s'\"]+\.json", source.location)
    file_name = names[-1] if names else "manifest.json"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", file_name.removesuffix(".json"))
    artifact = wandb.Artifact(f"data-{stem}", type="dataset", metadata={
        "dataset": source.spec.name, "split": source.split, "num_samples": source.num_samples,
        "shards": len(source.urls), "sha256": manifest_sha256(source.manifest)})
    if source.local:
        artifact.add_file(source.location, name=file_name)
    else:
        with artifact.new_file(file_name) as f:
            json.dump(source.manifest, f, indent=1)
    for url in source.urls:
        if "://" in url:  # a pipe: command is no URL wandb could reference
            artifact.add_reference(url, checksum=False)
    return artifact


def use_dataset_artifact(run: Any, plan: RunPlan) -> None:
    """The train data's ``dataset_artifact`` as an input of the run (lineage). Online only: offline,
    wandb refuses to record a use (``use_artifact`` raises "Cannot use artifact when in offline
    mode", wandb 0.31), and ``data_sha256`` in the config stands for it. A failure here is one
    warning and costs the tracker nothing else."""
    if run.offline:
        return
    try:
        artifact = dataset_artifact(plan.train_source)
        if artifact is not None:
            run.use_artifact(artifact)
    except Exception as e:  # noqa: BLE001 -- lineage is a nicety
        warnings.warn(f"wandb: the dataset artifact was not recorded ({type(e).__name__}: {e})", RuntimeWarning)


def append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return str(value)


# ----------------------------------------------------------------------------- validation samples

class ValidationSamples:
    """``evaluate``'s ``on_batch`` for a tracker: per-image IoU and pixel accuracy of every
    validation image, and the images with both masks of the ``count`` smallest ids this rank
    sees. The smallest ids of a split are the same whatever the process count, worker count
    or order, so every run of a study shows the same images; ``gather`` merges the ranks'.

    Per image: pixel accuracy over labelled pixels, IoU as the mean over the classes present
    in its label or its prediction (what a user sorts by to find the worst images).
    """

    def __init__(self, count: int, mean: Any, std: Any, num_classes: Optional[int] = None) -> None:
        self.count, self.mean, self.std, self.num_classes = count, mean, std, num_classes
        self.kept: dict[str, dict] = {}
        self.rows: list[list] = []  # [id, iou, acc]

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor, ids: list) -> None:
        for i, sample_id in enumerate(map(str, ids)):
            self.rows.append([sample_id, *image_scores(masks[i], preds[i], self.num_classes)])
            if self.count and (len(self.kept) < self.count or sample_id < max(self.kept)):
                self.kept[sample_id] = {"id": sample_id, "image": denormalize(images[i], self.mean, self.std),
                                        "mask": masks[i].cpu().numpy().astype(np.uint8),
                                        "pred": preds[i].cpu().numpy().astype(np.uint8)}
                if len(self.kept) > self.count:
                    del self.kept[max(self.kept)]

    def gather(self, accelerator: "Accelerator") -> dict:
        """``{"examples": [...], "per_image": [[id, iou, acc], ...]}`` of all ranks, on the main
        process only (the others get {}): a collective, call on every rank."""
        mine = {"examples": list(self.kept.values()), "per_image": self.rows}
        parts = [mine]
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            parts = [None] * accelerator.num_processes if accelerator.is_main_process else None
            dist.gather_object(mine, parts, dst=0)
        if not accelerator.is_main_process:
            return {}
        examples = sorted((e for p in parts for e in p["examples"]), key=lambda e: e["id"])[:self.count]
        return {"examples": examples, "per_image": sorted((r for p in parts for r in p["per_image"]),
                                                          key=lambda r: r[0])}


def image_scores(mask: torch.Tensor, pred: torch.Tensor, num_classes: Optional[int]) -> tuple[float, float]:
    """(IoU over the classes present in label or prediction, pixel accuracy) of one image."""
    valid = mask != 255
    m, p = mask[valid].long(), pred[valid].long()
    if m.numel() == 0:
        return float("nan"), float("nan")
    n = int(num_classes or (max(int(m.max()), int(p.max())) + 1))
    conf = torch.bincount(m * n + p, minlength=n * n).view(n, n).double()
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    present = union > 0
    return float((inter[present] / union[present]).mean()), float(inter.sum() / conf.sum())


# ----------------------------------------------------------------------------- jsonl

class JsonlTracker(Tracker):
    """RUN_DIR/tracker.jsonl: one JSON object per event (start, log, validation, checkpoint,
    finish, evaluation): a dashboard's content without a dashboard."""

    name = "jsonl"
    wants_samples = True

    def _write(self, record: dict) -> None:
        append_line(self.plan.run_dir.tracker_jsonl, record)

    def _start(self, step: int) -> None:
        self._write({"event": "start", "step": step, "config": flat_config(self.plan)})

    def _log(self, row: dict) -> None:
        self._write({"event": "log", IMAGES_KEY: row["step"] * self.plan.cfg.batch_size, **row})

    def _log_validation(self, step: int, metrics: dict, samples: dict) -> None:
        self._write({"event": "validation", "step": step,
                     **class_scalars(metrics["iou"], metrics["class_acc"], self.plan.spec.classes),
                     "per_image": [dict(zip(("id", "iou", "acc"), row)) for row in samples.get("per_image", ())]})

    def _log_checkpoint(self, path: Path, step: int) -> None:
        self._write({"event": "checkpoint", "step": step, "file": path.name})

    def _finish(self, step: int, metrics: dict, exit_code: int) -> None:
        self._write({"event": "finish", "step": step, "exit_code": exit_code,
                     **({"final/val_miou": metrics["miou"]} if metrics and not exit_code else {})})


# ----------------------------------------------------------------------------- Accelerate's trackers

class AccelerateTracker(Tracker):
    """One of Accelerate's trackers by name (``accelerate.tracking``), given scalars only.

    TensorBoard writes to RUN_DIR/tensorboard; a resume purges the events an earlier attempt
    wrote after the checkpoint (``purge_step``), so each step shows once.
    """

    def __init__(self, plan: RunPlan, main: bool, name: str) -> None:
        super().__init__(plan, main)
        self.name = name
        self.tracker: Any = None

    def _start(self, step: int) -> None:
        self.tracker = make_accelerate_tracker(self.name, self.plan.cfg.name, self.plan.run_dir,
                                               {"purge_step": step + 1} if self.name == "tensorboard" and step else {})
        self.tracker.store_init_configuration(scalar_config(flat_config(self.plan)))

    def _log(self, row: dict) -> None:
        self.tracker.log({IMAGES_KEY: row["step"] * self.plan.cfg.batch_size, **scalars(row)}, step=row["step"])

    def _log_validation(self, step: int, metrics: dict, samples: dict) -> None:
        self.tracker.log(class_scalars(metrics["iou"], metrics["class_acc"], self.plan.spec.classes), step=step)

    def _finish(self, step: int, metrics: dict, exit_code: int) -> None:
        self.tracker.finish()


def make_accelerate_tracker(name: str, run_name: Optional[str], run_dir: RunDir, kwargs: dict) -> Any:
    """Accelerate's tracker class ``name``, constructed and started (main process)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from segtrain.files import ConfigError

    cls = LOGGER_TYPE_TO_CLASS.get(name)
    available = getattr(__import__("accelerate.utils", fromlist=["x"]), f"is_{name}_available", lambda: True)
    if cls is None or not available():
        raise ConfigError(f"--tracker {name}: {ACCELERATE_TRACKERS[name]}; it is not installed here")
    if cls.requires_logging_directory:  # TensorBoard: RUN_DIR/tensorboard; Aim: RUN_DIR
        logs = run_dir.tensorboard if name == "tensorboard" else run_dir.root / (run_name or "segtrain")
        tracker = cls(logs.name, str(logs.parent), **kwargs)
    else:
        tracker = cls(run_name or "segtrain", **kwargs)
    if hasattr(tracker, "start"):  # Accelerate >= 1.2 opens the backend in start()
        tracker.start()
    return tracker


def scalars(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def scalar_config(config: dict) -> dict[str, Any]:
    """Hyperparameters as TensorBoard's hparams (and the others) take them: numbers, bools, strings."""
    return {k: v if isinstance(v, (int, float, bool, str)) or v is None else str(v) for k, v in config.items()
            if v is not None}


def accelerate_log_evaluation(name: str, run_dir: RunDir, summary: dict, result: dict) -> Optional[str]:
    step = int(torch.load(result["checkpoint"], map_location="cpu", weights_only=True).get("step") or 0)
    tracker = make_accelerate_tracker(name, run_dir.root.name, run_dir, {})
    tracker.log(scalars(summary), step=step)
    tracker.finish()
    return str(run_dir.tensorboard) if name == "tensorboard" else name


# ----------------------------------------------------------------------------- wandb

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


def job_run_id(run_dir: RunDir, resuming: bool) -> str:
    """The wandb id this launch asks for: the job's own (RUN_DIR/wandb_id) when it resumes, else
    the one a wandb agent or the user set (WANDB_RUN_ID), else a new one. Under a sweep wandb
    uses the agent's id whatever is asked: ``WandbTracker`` records ``run.id``, never this."""
    id_file = run_dir.wandb_id
    if resuming and id_file.is_file() and id_file.read_text().strip():
        return id_file.read_text().strip()
    return os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:16]


def sweep_trial_id() -> Optional[str]:
    """The run id a wandb agent gave this trial (None outside a sweep)."""
    return os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None


class WandbTracker(Tracker):
    """One wandb run per job: every resume, requeue and resubmit continues the id in
    RUN_DIR/wandb_id (``resume="allow"``), sends only the steps after the last one the run
    already has (online: ``run.step``; offline: the history of the earlier offline folders
    with that id, which ``wandb sync`` merges) and fills any gap from metrics.jsonl, and
    recomputes ``best/*`` from metrics.jsonl (an offline run starts with an empty summary).

    Rows are charted against ``step`` and carry ``images_seen``; ``best/val_miou`` is a history
    metric (Hyperband needs one). A stop marks the run preempting and ends it with the process's
    exit status, so its state is not "finished".
    """

    name = "wandb"
    wants_samples = True

    def __init__(self, plan: RunPlan, main: bool) -> None:
        super().__init__(plan, main)
        self.run: Any = None
        self.logged_to = -1  # the run already has every step up to this one
        self.best: Optional[tuple[float, int]] = None

    def _start(self, step: int) -> None:
        import wandb

        plan, cfg = self.plan, self.plan.cfg
        self.run = wandb.init(project=cfg.wandb_project, config=flat_config(plan),
                              **init_kwargs(plan, job_run_id(plan.run_dir, cfg.resume is not None)))
        id_file = plan.run_dir.wandb_id
        if not id_file.is_file() or id_file.read_text().strip() != self.run.id:  # an agent's id, or a new one
            atomic_write_bytes(id_file, self.run.id.encode())
        self.run.define_metric(STEP_KEY, hidden=True)
        self.run.define_metric(IMAGES_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        self.logged_to = max(self.run.step - 1, last_offline_step(plan.run_dir, self.run.id, self.run.dir))
        self._catch_up(step)
        if step == 0:
            use_dataset_artifact(self.run, plan)

    def _catch_up(self, step: int) -> None:
        """Send metrics.jsonl's records the run does not have yet (a killed attempt's lost tail, or
        none), and take best/* from the whole record."""
        path = self.plan.run_dir.metrics
        for record in read_metrics_log(path) if path.is_file() else []:
            if "val/miou" in record and (self.best is None or record["val/miou"] > self.best[0]):
                self.best = (record["val/miou"], record["step"])
            if self.logged_to < record["step"] <= step:
                self._log({k: v for k, v in record.items() if not isinstance(v, list)})
                if "val/miou" in record:
                    self.run.log(self._validation_row(record.get("val/iou"), record.get("val/class_acc")),
                                 step=record["step"])
        if self.best:
            self.run.summary.update({"best/val_miou": self.best[0], "best/step": self.best[1]})

    def _validation_row(self, iou: Optional[list], acc: Optional[list]) -> dict:
        """Per-class scalars and the best so far (a history metric too: Hyperband needs one)."""
        return {**class_scalars(iou, acc, self.plan.spec.classes),
                **({"best/val_miou": self.best[0], "best/step": self.best[1]} if self.best else {})}

    def _log(self, row: dict) -> None:
        if row["step"] > self.logged_to:
            self.run.log({**row, IMAGES_KEY: row["step"] * self.plan.cfg.batch_size}, step=row["step"])

    def _log_validation(self, step: int, metrics: dict, samples: dict) -> None:
        import wandb

        if self.best is None or metrics["miou"] > self.best[0]:  # the rule of best.pt: strictly better
            self.best = (metrics["miou"], step)
        names = self.plan.spec.classes
        table = wandb.Table(columns=["class", "iou", "acc"], data=[
            [n, _none_if_nan(i), _none_if_nan(a)] for n, i, a in zip(names, metrics["iou"], metrics["class_acc"])])
        row = {"val/per_class": table, **self._validation_row(metrics["iou"], metrics["class_acc"])}
        if samples.get("per_image"):
            row["val/per_image"] = wandb.Table(columns=["id", "iou", "acc"], data=[
                [i, _none_if_nan(iou), _none_if_nan(acc)] for i, iou, acc in samples["per_image"]])
        labels = {i: name for i, name in enumerate(names)} | {255: "ignore"}
        # One key per image: images of different sizes in one list make wandb warn and draw them wrongly.
        row |= {f"val/overlay/{ex['id']}": wandb.Image(ex["image"], caption=ex["id"], masks={
            "predictions": {"mask_data": ex["pred"], "class_labels": labels},
            "ground_truth": {"mask_data": ex["mask"], "class_labels": labels}}) for ex in samples.get("examples", ())}
        if step > self.logged_to:
            self.run.log(row, step=step)
        self.run.summary.update({"best/val_miou": self.best[0], "best/step": self.best[1]})

    def _log_checkpoint(self, path: Path, step: int) -> None:
        if self.plan.cfg.log_model != "none":
            log_model_artifact(self.run, path, ["best"])

    def _finish(self, step: int, metrics: dict, exit_code: int) -> None:
        import wandb

        if exit_code:  # preempted: requeued, resumed into this run
            self.run.mark_preempting()
        elif metrics:
            self.run.summary.update({"final/val_miou": metrics["miou"], "final/val_pixel_acc": metrics["pixel_acc"],
                                     "final/step": step})
        if self.plan.cfg.log_model == "final" and not exit_code:
            log_model_artifact(self.run, self.plan.run_dir.final, ["final"])
        self.run.finish(exit_code=exit_code)
        # finish() can return before wandb-core has written the run file (seen under load); its
        # teardown waits for it, so the offline folder is complete when train() returns.
        wandb.teardown()

    def _abandon(self) -> None:
        # wandb's atexit hook would tear down the dead wandb-core again and print a traceback at
        # exit; its own teardown unregisters that hook first, then fails quietly here.
        import wandb

        wandb.teardown()

    def _closing_words(self, exit_code: int) -> None:
        offline = offline_folders(self.plan.run_dir)
        if offline and not exit_code:
            print("wandb ran offline; upload this run (every launch, oldest first) with:  wandb sync "
                  + " ".join(str(p) for p in offline))


def _none_if_nan(value: Optional[float]) -> Optional[float]:
    return None if value is None or math.isnan(value) else value


def init_kwargs(plan: RunPlan, run_id: str) -> dict:
    """``wandb.init`` arguments for this launch (besides project and config)."""
    cfg = plan.cfg
    tags = [t.strip() for t in (cfg.tags or "").split(",") if t.strip()]
    kwargs = {"dir": str(plan.run_dir), "name": cfg.name, "id": run_id, "resume": "allow", "tags": tags or None,
              "notes": cfg.notes, "group": cfg.group or os.environ.get("WANDB_RUN_GROUP"), "job_type": "train",
              "mode": wandb_mode()}
    return {k: v for k, v in kwargs.items() if v is not None}


def log_model_artifact(run: Any, path: Path, aliases: list[str]) -> None:
    """``path`` as a version of the model artifact ``model-<run id>``, its metrics and step in the
    metadata. Copied into wandb's staging folder (the default policy): best.pt is overwritten at
    the next improvement, and ``wandb sync`` elsewhere needs no file outside wandb's folders."""
    import wandb

    if not path.is_file():
        return
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    metadata = {"step": ckpt.get("step"), "file": path.name,
                **{k: v for k, v in (ckpt.get("metrics") or {}).items() if not isinstance(v, list)},
                "arch": ckpt["config"].get("arch"), "backbone": ckpt["config"].get("backbone")}
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
    artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact, aliases=[*aliases, f"step-{ckpt.get('step')}", "latest"])


def offline_folders(run_dir: PathLike) -> list[Path]:
    """``RUN_DIR/wandb/offline-run-<YYYYMMDD_HHMMSS>-<id>`` folders in the order they were written."""
    return sorted(RunDir(run_dir).wandb.glob("offline-run-*"), key=lambda p: (p.stat().st_mtime, p.name))


def last_offline_step(run_dir: PathLike, run_id: str, current: Optional[str] = None) -> int:
    """The last history step of run ``run_id`` in RUN_DIR's earlier offline folders (-1: none);
    ``current``: this launch's own folder (or a path inside it), left out."""
    last = -1
    for folder in RunDir(run_dir).wandb.glob(f"offline-run-*-{run_id}"):
        if current and Path(current).resolve().is_relative_to(folder.resolve()):
            continue
        for path in folder.glob(f"run-{run_id}.wandb"):
            for record in wandb_records(path):
                if record.WhichOneof("record_type") == "history":
                    last = max(last, record.history.step.num)
    return last


def wandb_records(path: Path) -> Iterator[Any]:
    """The ``Record``s of an offline run file, up to a tail left incomplete by a killed process.

    wandb ships no reader: the file is a 7-byte header (``:W&B``, uint16 0xBEE1, uint8 version),
    then LevelDB-log framing: 32 KiB blocks; each record a 7-byte header (uint32 CRC, uint16
    length, uint8 type 1 FULL / 2 FIRST / 3 MIDDLE / 4 LAST) and its payload; a block tail
    under 7 bytes is padding. Each whole payload is a ``wandb_internal_pb2.Record``.
    """
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        return
    pos, parts = 7, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if (kind == 0 and length == 0) or pos + header + length > len(data):  # zero fill, or cut short
            return
        payload = data[pos + header:pos + header + length]
        pos += header + length
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(parts)
            except DecodeError:
                return
            yield record


def wandb_log_evaluation(run_dir: RunDir, summary: dict) -> Optional[str]:
    """``summary`` into the training's wandb run (the id in RUN_DIR/wandb_id), so final, best and
    ms-flip mIoU sit in one row of the runs table. None when RUN_DIR has no wandb run."""
    import wandb
    import yaml

    id_file = run_dir.wandb_id
    if not id_file.is_file():
        return None
    saved = yaml.safe_load(run_dir.config.read_text()) if run_dir.config.is_file() else {}
    mode = wandb_mode()
    run = wandb.init(project=(saved or {}).get("wandb_project", "segtrain"), id=id_file.read_text().strip(),
                     resume="allow", dir=str(run_dir), **({"mode": mode} if mode else {}))
    run.summary.update(summary)
    run_id = run.id
    run.finish()
    wandb.teardown()  # the run file is complete when this returns (see WandbTracker._finish)
    return run_id


__all__ = ["TRACKERS", "DEFAULT_TRACKER", "TRACKER_HELP", "LOG_MODEL", "DEFAULT_LOG_MODEL", "GROUP_HELP",
           "TAGS_HELP", "NOTES_HELP", "Tracker", "open_tracker", "log_evaluation", "ValidationSamples",
           "WandbTracker", "JsonlTracker", "AccelerateTracker", "wandb_mode", "offline_folders",
           "last_offline_step", "wandb_records", "flat_config"]
