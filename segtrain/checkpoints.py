"""Checkpoints and the run directory: every path a run writes, and every file format it keeps.

* ``RunDir``: one value that knows every path in a run directory (config.yaml, metrics.jsonl,
  checkpoints/step_NNNNNNN, best.pt, final.pt, wandb/, wandb_id, tensorboard/, tracker.jsonl,
  eval_*.json); nothing else builds these paths by hand.
* The model checkpoint file (best.pt, final.pt, converted weights): ``save_checkpoint`` writes
  ``{"model", "model_config", "normalization", **extras}``; ``read_checkpoint`` reads it back
  (``torch_load``: weights_only, one-line errors); ``model.load_checkpoint`` rebuilds the model.
* The training state a resume needs (``TrainState``, ``save_training_state``, ``resolve_resume``,
  ``read_train_state``): Accelerate's ``save_state`` folders, written atomically.
* ``MetricsLog`` / ``read_metrics_log``: metrics.jsonl, the plain-text record reports read.

Change the checkpoint format here (and its readers stay in step). This module builds no model:
``model`` imports it for ``torch_load`` and ``load_weights``, not the other way round.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import nn

from segtrain.files import ConfigError, DataError, PathLike, atomic_write_bytes, naming_write_errors
from segtrain.metrics import to_jsonable

if TYPE_CHECKING:
    from accelerate import Accelerator


class CheckpointError(DataError):
    """A weights file that cannot be used; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- the run directory

STEP_DIR = "step_{:07d}"  # checkpoints/step_0001000: sorts by step as text


@dataclass(frozen=True)
class RunDir:
    """Every path of one run directory (RUN_DIR). ``os.fspath(run_dir)`` is its root."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @classmethod
    def of_checkpoint(cls, checkpoint: PathLike) -> "RunDir":
        """The run directory a model file (RUN_DIR/best.pt, RUN_DIR/final.pt) sits in."""
        return cls(Path(checkpoint).parent)

    @property
    def config(self) -> Path:
        """config.yaml: the config the run started with, plus ``resolved`` (what "auto" became)."""
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        """metrics.jsonl: one JSON object per log line and validation."""
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        """checkpoints/: the training states a resume loads (Accelerate's save_state folders)."""
        return self.root / "checkpoints"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / STEP_DIR.format(step)

    def step_tmp(self, step: int) -> Path:
        """Where a training state is written before the rename to ``step_dir(step)``."""
        return self.checkpoints / f".{STEP_DIR.format(step)}.tmp"

    def step_dirs(self) -> list[Path]:
        """The complete training-state checkpoints, oldest first (temp folders excluded)."""
        return sorted(self.checkpoints.glob("step_*"))

    @property
    def best(self) -> Path:
        """best.pt: the model at the best validation mIoU."""
        return self.root / "best.pt"

    @property
    def final(self) -> Path:
        """final.pt: the model after the last step."""
        return self.root / "final.pt"

    def model_file(self, name: str) -> Path:
        """``"best"`` or ``"final"``: the model file of that name."""
        return {"best": self.best, "final": self.final}[name]

    @property
    def wandb(self) -> Path:
        """wandb/: wandb's own run folders (offline-run-* until synced)."""
        return self.root / "wandb"

    @property
    def wandb_id(self) -> Path:
        """wandb_id: the wandb run id, so a resume or a later evaluation adds to the same run."""
        return self.root / "wandb_id"

    @property
    def tensorboard(self) -> Path:
        """tensorboard/: TensorBoard's event files."""
        return self.root / "tensorboard"

    @property
    def tracker_jsonl(self) -> Path:
        """tracker.jsonl: what the local JSON-lines tracker (--tracker jsonl) records."""
        return self.root / "tracker.jsonl"

    def eval_result(self, split: str, protocol: str) -> Path:
        """``segtrain.evaluate``'s default --out for a model file of this run: eval_<split>_<protocol>.json."""
        return self.root / f"eval_{split}_{protocol}.json"


def read_metrics_log(path: PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash (kill, full disk) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """RUN_DIR/metrics.jsonl: one JSON object per line, the plain-text record reports read."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a crashed run wrote after the checkpoint it resumes from (the file
        is left untouched when there are none: a resubmitted finished job changes no file)."""
        if self.enabled and self.path.exists():
            records = read_metrics_log(self.path)
            keep = [r for r in records if r["step"] <= step]
            if len(keep) < len(records):
                atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def write(self, record: dict) -> None:
        if self.enabled:
            with naming_write_errors(self.path), open(self.path, "a") as f:
                f.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- training state (resume)

class TrainState:
    """What the loop needs to resume besides model, optimizer and RNGs (saved by Accelerate).

    ``data_order`` holds every setting the sequence of batches depends on; a resume
    that changes one of them would continue on different batches, so it is refused (but the
    process layout, on another number of processes). ``layouts``: the run's process layouts,
    ``[step, processes, per-process batch]`` from the step each began (segtrain.plan, which reads
    it before the resume: ``read_train_state``).
    """

    def __init__(self, data_order: dict, layouts: Sequence[Sequence[int]] = ()) -> None:
        self.step = 0
        self.best_miou = -1.0
        self.data_order = data_order
        self.layouts = [list(layout) for layout in layouts]
        self.saved_data_order: Optional[dict] = None

    def state_dict(self) -> dict:
        return {"step": self.step, "best_miou": self.best_miou, "data_order": self.data_order,
                "layouts": self.layouts}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_miou = int(state["step"]), float(state["best_miou"])
        self.saved_data_order = state.get("data_order")

    def check_resume(self, may_change: Collection[str] = ()) -> None:
        """Refuse a resume whose data-order settings differ from the checkpoint's, but ``may_change``
        (the process layout of a resume on another number of processes: segtrain.plan.LAYOUT_KEYS)."""
        saved = {k: v for k, v in (self.saved_data_order or {}).items() if k not in may_change}
        unknown = sorted(set(saved) - set(self.data_order))
        if unknown:  # e.g. written before the record became the loader's own arguments
            raise ConfigError(f"resume: the checkpoint records data-order settings this version does not have "
                              f"({', '.join(unknown)}); resume it with the segtrain version that wrote it")
        changed = {k: (v, self.data_order[k]) for k, v in saved.items() if self.data_order[k] != v}
        if changed:
            raise ConfigError("resume: the checkpoint was trained with " + ", ".join(
                f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
                + "; resume with the same settings, or the batches would not continue where they stopped")


# What Accelerate's save_state writes into a checkpoint folder: register_for_checkpointing's first
# object (the TrainState) and one RNG file per process (random_states_K.pkl: a resume on more
# processes finds none for the new ones, and the loop re-seeds every process). Accelerate's name.
TRAIN_STATE_FILE = "custom_checkpoint_0.pkl"


def save_training_state(accelerator: "Accelerator", run_dir: RunDir, step: int, keep: int) -> None:
    """``save_state`` into a temp folder, then rename: a crash never leaves a half checkpoint
    that ``--resume latest`` would pick. Assumes RUN_DIR is on a filesystem all nodes share."""
    final, tmp = run_dir.step_dir(step), run_dir.step_tmp(step)
    try:
        with naming_write_errors(final):  # a full disk is one line, and leaves no temp folder
            accelerator.save_state(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in run_dir.step_dirs()[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resolve_resume(resume: str, run_dir: RunDir) -> Optional[Path]:
    """The checkpoint folder ``--resume`` names (``latest``: the newest of RUN_DIR; ``auto``: the
    newest of RUN_DIR, or None for a fresh start when it has none)."""
    if resume == "auto":
        found = run_dir.step_dirs()
        return found[-1] if found else None
    if resume == "latest":
        found = run_dir.step_dirs()
        if not found:
            raise ConfigError(f"resume: no checkpoint in {run_dir.checkpoints} to resume from")
        return found[-1]
    path = Path(resume)
    if not (path / TRAIN_STATE_FILE).is_file():  # the TrainState that save_state writes
        raise ConfigError(f"resume: {path} is not a checkpoint folder (expected RUN_DIR/checkpoints/step_*)")
    return path


def read_train_state(checkpoint: Path) -> Optional[dict]:
    """The TrainState record of ``checkpoint`` (``TrainState.state_dict``), read before
    ``accelerator.load_state``: a resume on another number of processes plans its batch and its
    data from it (segtrain.plan); None where the folder has none (``load_state`` then says so)."""
    path = checkpoint / TRAIN_STATE_FILE
    if not path.is_file():
        return None
    state = torch_load(path)
    return state if isinstance(state, dict) else None


# ----------------------------------------------------------------------------- the model file

def summary(metrics: dict) -> dict:
    """The JSON-safe scalar and per-class metrics stored in best.pt / final.pt."""
    keep = ("miou", "pixel_acc", "mean_class_acc", "fwiou", "iou", "class_acc", "num_images")
    return to_jsonable({k: metrics[k] for k in keep if k in metrics})


def load_weights(module: nn.Module, state: Mapping[str, Any], source: str, skip: Collection[str] = ()) -> None:
    """Strict ``load_state_dict`` that fails with one message naming every bad key.

    Keys in ``skip`` are neither loaded nor required (they keep their current values).
    A missing ``num_batches_tracked`` is tolerated, as torch does: old weights predate it.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and k not in skip and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} in file "
             f"vs {tuple(own[k].shape)} in model"
             for k, v in state.items()
             if k in own and k not in skip and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)]
    problems = [f"{label} ({len(keys)}): {_listing(keys)}"
                for label, keys in (("wrong shape", wrong), ("missing", missing), ("unexpected", unexpected))
                if keys]
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(problems))
    module.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")




# numpy scalars are plain data; VainF's checkpoints store best_score as one. Unpickling
# one needs numpy's scalar constructor (numpy.core in numpy 1, numpy._core in numpy 2) and
# the dtype classes.
_numpy_scalar = np.float64(0).__reduce__()[0]
_NUMPY_SCALAR_GLOBALS = [
    np.dtype,
    *{type(np.dtype(code)) for code in "?bBhHiIlLqQefdFD"},
    *((_numpy_scalar, f"{module}.multiarray.scalar") for module in ("numpy.core", "numpy._core")),
]
_ALLOWED_GLOBAL_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                         for g in _NUMPY_SCALAR_GLOBALS}


def torch_load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for missing and unreadable files."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not _looks_like_torch_save(path):
        raise CheckpointError(f"{path}: not a readable PyTorch weights file: not a PyTorch checkpoint at all "
                              "(torch.save writes a zip archive, or a pickle before PyTorch 1.6; this file is "
                              "neither: damaged, cut short, or another format)")
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a bad file surfaces as RuntimeError, EOFError, KeyError, ... depending on the bytes
        unsafe = _unsafe_globals(path) if isinstance(e, pickle.UnpicklingError) else []
        if unsafe:
            raise CheckpointError(
                f"{path}: holds pickled Python objects ({_listing(unsafe, 5)}) that weights_only loading "
                "refuses; re-save it with only tensors, numbers, strings, lists and dicts") from None
        first_line = next((line for line in str(e).splitlines() if line.strip()), "")
        if "Weights only load failed" in first_line:  # PyTorch's hint is about safe loading, not this file
            first_line = "damaged, or not a PyTorch checkpoint"
        raise CheckpointError(f"{path}: not a readable PyTorch weights file "
                              f"({type(e).__name__}: {first_line[:200]})") from None


def _looks_like_torch_save(path: PathLike) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # a legacy torch.save pickle starts with the PROTO opcode


def _unsafe_globals(path: PathLike) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint at all: nothing to list
        return []
    return [name for name in found if name not in _ALLOWED_GLOBAL_NAMES]


def save_checkpoint(path: PathLike, model: nn.Module, **extra: Any) -> None:
    """Write ``{"model": state_dict, "model_config": ..., "normalization": {"mean", "std"}, **extra}``
    atomically.

    ``extra`` must be loadable with ``weights_only=True`` (tensors, numbers, strings, lists, dicts).
    """
    if not hasattr(model, "model_config"):  # a DDP or compile wrapper hides it
        raise TypeError(f"save_checkpoint needs the bare DeepLab model, got {type(model).__name__} "
                        "(unwrap it first, e.g. accelerator.unwrap_model(model))")
    clash = {"model", "model_config", "normalization"} & extra.keys()
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {sorted(clash)} are reserved")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "model_config": dict(model.model_config),
                "normalization": {"mean": list(model.mean), "std": list(model.std)}, **extra}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict:
    """The dict ``save_checkpoint`` wrote, checked to be a segtrain checkpoint (no model built)."""
    ckpt = torch_load(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a segtrain checkpoint (no 'model' entry; found {found}); "
                              "convert VainF/torchvision weights with tools/convert_checkpoint.py")
    if "model_config" not in ckpt:
        raise CheckpointError(f"{path}: checkpoint has no 'model_config', so the model cannot be rebuilt; "
                              "convert VainF/torchvision weights with tools/convert_checkpoint.py")
    return ckpt


def checkpoint_class_names(ckpt: Mapping[str, Any]) -> Optional[list[str]]:
    """The class names a checkpoint was trained on, when it carries them (top-level
    ``class_names``, or in a ``dataset`` spec as ``class_names`` or ``classes``)."""
    dataset = ckpt.get("dataset")
    for names in (ckpt.get("class_names"), *((dataset.get("class_names"), dataset.get("classes"))
                                               if isinstance(dataset, Mapping) else ())):
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            return list(names)
    return None


def check_fits_data(ckpt: Mapping[str, Any], path: PathLike, data_class_names: Optional[Sequence[str]],
                    data_where: str) -> None:
    """Refuse a checkpoint whose classes are not the data's, before any work is done.

    Compares the class count, and the names when the checkpoint carries them.
    ``data_class_names`` None (data that does not say, e.g. a bare shard pattern) checks nothing.
    """
    if data_class_names is None:
        return
    num_classes = ckpt["model_config"]["num_classes"]
    fix = f"; fine-tune it on this data with --init-from {path}"
    if num_classes != len(data_class_names):
        shown = ", ".join(list(data_class_names)[:4]) + (", ..." if len(data_class_names) > 4 else "")
        raise CheckpointError(f"{path}: checkpoint has {num_classes} classes, data has {len(data_class_names)} "
                              f"({data_where}: {shown}){fix}")
    names = checkpoint_class_names(ckpt)
    if names is not None and list(names) != list(data_class_names):
        i = next(i for i, (a, b) in enumerate(zip(names, data_class_names)) if a != b)
        raise CheckpointError(f"{path}: checkpoint class {i} is {names[i]!r}, but {data_where} calls it "
                              f"{data_class_names[i]!r}: trained on other classes{fix}")


def set_normalization(model: nn.Module, ckpt: Mapping[str, Any], source: str) -> None:
    """Give ``model`` the checkpoint's input normalisation (older checkpoints have none: keep the model's)."""
    norm = ckpt.get("normalization")
    if norm is None:
        return
    try:
        mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{source}: 'normalization' must hold 3 'mean' and 3 'std' numbers") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(f"{source}: 'normalization' must hold 3 'mean' and 3 positive 'std' numbers")
    model.mean, model.std = mean, std


def init_from_checkpoint(model: nn.Module, path: PathLike) -> list[str]:
    """Fine-tuning start: load a segtrain checkpoint's backbone and head into ``model``.

    ``path`` is a segtrain checkpoint (best.pt, final.pt, or VainF/torchvision weights
    converted with tools/convert_checkpoint.py). Arch, backbone family and separable
    convs must match. When the class counts differ, the final classifier convs keep
    their fresh initialisation; an auxiliary head the checkpoint lacks stays fresh too,
    and one the model lacks is dropped. The model adopts the checkpoint's normalisation.
    Returns what was left at its initialisation (state-dict keys), for the log.
    """
    ckpt = read_checkpoint(path)
    source, own = ckpt["model_config"], model.model_config
    for key, same in (("arch", source.get("arch") == own["arch"]),
                      ("backbone", str(source.get("backbone")).split(".")[0] == own["backbone"].split(".")[0]),
                      ("separable", bool(source.get("separable")) == own["separable"])):
        if not same:
            raise CheckpointError(f"{path}: --init-from needs the same {key}: the checkpoint has "
                                  f"{source.get(key)!r}, this run {own[key]!r}")
    state = dict(ckpt["model"])
    if model.aux_head is None:
        state = {k: v for k, v in state.items() if not k.startswith("aux_head.")}
    fresh = set(model.classifier_keys()) if source.get("num_classes") != own["num_classes"] else set()
    if model.aux_head is not None and not source.get("aux_head"):
        fresh |= {k for k in model.state_dict() if k.startswith("aux_head.")}
    load_weights(model, {k: v for k, v in state.items() if k not in fresh}, str(path), skip=fresh)
    set_normalization(model, ckpt, str(path))
    return sorted(fresh)


