"""Compare training runs side by side: a Markdown report with PNG figures.

    python -m segtrain.report runs/ce runs/weighted_ce --out reports/losses
    python -m segtrain.report runs/ce runs/focal --out r/ --ids 2007_000129 2007_000323 ...
    python -m segtrain.report runs/demo --out r/ --sam-checkpoint sam_vit_b_01ec64.pth

Writes into --out:
  report.md          the report (links the figures below)
  curves.png         val mIoU per epoch of every run, and the training loss
  class_balance.png  per-class pixel and image share of the training data
  predictions.png    5 val images: | RGB | Ground truth | run 1 | run 2 | ... [| SAM | SAM-refined]
  summary.json       the table's numbers

It reads only what every run directory holds: config.yaml, metrics.jsonl and best.pt.
Class names and colours come from the first run's best.pt (its dataset spec); every
run must have the same classes.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from segtrain import autotune, hardware, loaders, stats, visualize
from segtrain.sources import DataSource, class_names, resolve_data
from segtrain.cli import user_errors
from segtrain.datasets import DatasetSpec, decode_target, spec_from_checkpoint
from segtrain.checkpoints import RunDir, check_fits_data, read_checkpoint, read_metrics_log
from segtrain.files import DataError, atomic_write_bytes
from segtrain.inference import predict_mask
from segtrain.metrics import subset_miou
from segtrain.model import load_checkpoint


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    records: list[dict]

    @property
    def files(self) -> RunDir:
        return RunDir(self.path)

    @property
    def vals(self) -> list[dict]:
        return [r for r in self.records if "val/miou" in r]

    @property
    def best(self) -> Optional[dict]:
        return max(self.vals, key=lambda r: r["val/miou"], default=None)


def load_run(path: Path) -> Run:
    """A run directory written by segtrain/train.py."""
    files = RunDir(path)
    for need in (files.config, files.metrics):
        if not need.is_file():
            raise DataError(f"{path}: not a segtrain run directory (no {need.name})")
    config = yaml.safe_load(files.config.read_text())
    records = read_metrics_log(files.metrics)
    return Run(path.name, path, config, records)


def unique_names(runs: list[Run]) -> None:
    """Label runs by folder name, falling back to the parent folder when two names collide."""
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"


def validated_once(run: Run) -> bool:
    return len(run.vals) == 1


def curves_figure(runs: list[Run]):
    """Val mIoU per epoch (left) and training loss per step (right), one line per run.

    A run that validated once has one mIoU point: it is drawn as that point plus a dashed
    level from epoch 0, and its legend entry says so (a lone dot is easy to miss).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2), dpi=110)
    ax_miou, ax_loss = fig.subplots(1, 2)
    for run in runs:
        vals = run.vals
        epochs, mious = [r["epoch"] for r in vals], [r["val/miou"] for r in vals]
        if validated_once(run):
            (point,) = ax_miou.plot(epochs, mious, marker="o", markersize=8, linestyle="none")
            ax_miou.plot([0, epochs[0]], mious * 2, linestyle="--", color=point.get_color(),
                         label=f"{run.name} (validated once, epoch {epochs[0]:.3g})")
        else:
            ax_miou.plot(epochs, mious, marker="o", label=run.name)
        train = [r for r in run.records if "train/loss" in r]
        ax_loss.plot([r["step"] for r in train], [r["train/loss"] for r in train], label=run.name, alpha=0.85)
    ax_miou.set(xlabel="epoch", ylabel="val mIoU", title="Validation mIoU")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Training loss", yscale="log")
    for ax in (ax_miou, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(runs: list[Run], out: Path) -> Path:
    visualize.save_figure(curves_figure(runs), out)
    return out


PREDICTION_TILE_INCHES = 3.2  # a VOC image (500 px) readable at 100 dpi


def plot_predictions(rows: list[list[np.ndarray]], columns: Sequence[str], ids: Sequence[str], out: Path,
                     spec: DatasetSpec, legend_classes: Optional[Sequence[int]] = None) -> Path:
    """The prediction grid: large tiles shaped like the images (VOC's are mostly 4:3, not
    square), thin gaps between them, ``spec``'s colours (``legend_classes``, default all) below."""
    fig = visualize.image_grid(rows, col_titles=columns, row_titles=ids, tile_inches=PREDICTION_TILE_INCHES,
                               spec=spec, legend_classes=legend_classes)
    aspect = float(np.clip(np.median([t.shape[0] / t.shape[1] for row in rows for t in row if t is not None]),
                           0.5, 1.5))
    title_inches = 0.25
    legend_inches = visualize.legend_inches(spec.num_classes if legend_classes is None else len(legend_classes))
    width = PREDICTION_TILE_INCHES * len(columns)
    height = PREDICTION_TILE_INCHES * aspect * len(rows) + title_inches + legend_inches
    fig.set_size_inches(width, height)
    fig.subplots_adjust(left=0.25 / width, right=1 - 0.05 / width, top=1 - title_inches / height,
                        bottom=legend_inches / height, wspace=0.03, hspace=0.08)
    visualize.save_figure(fig, out)
    return out


def markdown_header(columns: Sequence[str]) -> str:
    """A table header row plus the separator row Markdown needs to render it as a table."""
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def best_checkpoint(run: Run) -> Path:
    best = run.files.best
    if not best.is_file():
        raise DataError(f"{run.path}: no best.pt (did the run validate at least once?)")
    return best


def run_spec(run: Run) -> DatasetSpec:
    """The classes and colours a run was trained on (its best.pt's dataset spec)."""
    best = best_checkpoint(run)
    return spec_from_checkpoint(read_checkpoint(best), str(best))


def results_table(runs: list[Run], rare: Sequence[int] = (),
                  class_names: Optional[Sequence[str]] = None) -> tuple[str, list[dict]]:
    """Markdown: one row per run (best mIoU, its pixel accuracy, mIoU over the ``rare``
    classes, per-class IoU), and the rows as data. ``class_names`` default to the
    first run's (its best.pt's dataset spec)."""
    if class_names is None:
        class_names = run_spec(runs[0]).classes
    rows = []
    for run in runs:
        best = run.best or {}
        iou = best.get("val/iou", [None] * len(class_names))
        rows.append({"run": run.name, "loss": run.config.get("loss"), "best_step": best.get("step"),
                     "miou": best.get("val/miou"), "pixel_acc": best.get("val/pixel_acc"),
                     "mean_class_acc": best.get("val/mean_class_acc"),
                     "rare_miou": subset_miou(iou, rare) if rare else None, "iou": iou})
    rare_head = f"mIoU of the {len(rare)} rarest classes" if rare else "rare-class mIoU"
    head = (f"| run | loss | best step | mIoU | {rare_head} | pixel acc | mean class acc |\n"
            "|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['run']} | {r['loss']} | {r['best_step']} | {_fmt(r['miou'])} | {_fmt(r['rare_miou'])} | "
                   f"{_fmt(r['pixel_acc'])} | {_fmt(r['mean_class_acc'])} |\n" for r in rows)
    if rare:
        body += "\nRarest classes by training pixel share: " + ", ".join(class_names[c] for c in rare) + "\n"
    per_class = ("| class | " + " | ".join(r["run"] for r in rows) + " |\n|---|"
                 + "---|" * len(rows) + "\n"
                 + "".join(f"| {name} | " + " | ".join(_fmt(r["iou"][c]) for r in rows) + " |\n"
                           for c, name in enumerate(class_names)))
    return head + body + "\n**Per-class IoU (%) at each run's best step**\n\n" + per_class, rows


def prediction_rows(runs: list[Run], source: DataSource, ids: Sequence[str],
                    device: torch.device, autocast_dtype: Optional[torch.dtype] = None) -> tuple[list[list[np.ndarray]], list[np.ndarray], list[np.ndarray]]:
    """Grid rows | RGB | GT | run... |, plus the images and labels (for optional SAM columns)."""
    spec = source.spec
    samples = {sid: (img, lbl) for sid, img, lbl in loaders.iter_samples(source, ids=ids)}
    images = [np.asarray(samples[sid][0]) for sid in ids]
    labels = [samples[sid][1] for sid in ids]
    rows = [[img, decode_target(lbl, spec)] for img, lbl in zip(images, labels)]
    for run in runs:
        model, _ = load_checkpoint(run.files.best, map_location=device)  # checked by check_runs_fit
        model.eval()
        for row, sid in zip(rows, ids):
            row.append(decode_target(predict_mask(model, samples[sid][0], device, autocast_dtype=autocast_dtype),
                                     spec))
        del model
    return rows, images, labels


def check_runs_fit(runs: list[Run], source: DataSource) -> None:
    """Every run has a best.pt whose classes are the data's."""
    for run in runs:
        best = best_checkpoint(run)
        check_fits_data(read_checkpoint(best), best, class_names(source), source.location)


def build_report(run_dirs: Sequence[Path], out: Path, data: Optional[str] = None, split: str = "val",
                 ids: Optional[Sequence[str]] = None, num_images: int = 5,
                 sam_checkpoint: Optional[str] = None, sam_model_type: str = "vit_b",
                 sam_points_per_side: int = 32, device: str = "auto", mixed_precision: str = "auto") -> Path:
    """Write the comparison report into ``out``; returns the path of report.md."""
    runs = [load_run(Path(p)) for p in run_dirs]
    if not runs:
        raise DataError("no run directories given")
    unique_names(runs)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    train_data = runs[0].config["data"]
    val_data = data or runs[0].config.get("val_data") or train_data

    val_source = resolve_data(val_data, split)
    check_runs_fit(runs, val_source)  # before any figure is written
    manifest = resolve_data(train_data, runs[0].config.get("train_split") or "train").manifest
    spec = run_spec(runs[0])
    plot_curves(runs, out / "curves.png")
    table, rows = results_table(runs, stats.rarest_classes(manifest) if manifest else (), spec.classes)
    sections = [f"# segtrain run comparison ({spec.name}, {spec.num_classes} classes)\n",
                "Runs: " + ", ".join(f"`{r.path}`" for r in runs) + "\n",
                "## Validation mIoU and training loss\n", "![curves](curves.png)\n",
                *(f"`{r.name}` validated once (epoch {r.vals[0]['epoch']:.3g}): its mIoU is one point, "
                  "drawn with a dashed level.\n" for r in runs if validated_once(r)),
                "## Results\n", table]

    if manifest is not None:
        stats.plot_class_balance(manifest, out / "class_balance.png", title="Training data class balance")
        sections += ["## Class balance of the training data\n",
                     "Share of labelled pixels (log scale) and of images containing each class. "
                     "mIoU averages over classes, so the rare ones weigh as much as background.\n",
                     "![class balance](class_balance.png)\n"]
    else:
        sections += ["## Class balance\n", f"`{train_data}` has no manifest with class counts; "
                     "pack it with tools/pack.py to get the class-balance chart.\n"]

    chosen = list(ids) if ids else visualize.covering_ids(val_source, num_images)
    amp = autotune.inference_autocast(mixed_precision, dev, load_checkpoint(runs[0].files.best,
                                                                            map_location=dev)[0])
    grid_rows, images, labels = prediction_rows(runs, val_source, chosen, dev, amp)
    columns = ["RGB", "Ground truth"] + [r.name for r in runs]
    if sam_checkpoint:
        from segtrain import sam
        sam_cols = sam.report_columns(sam_checkpoint, sam_model_type, images, semantic=runs[0].files.best,
                                      device=dev, points_per_side=sam_points_per_side, semantic_autocast=amp)
        for row, extra in zip(grid_rows, sam_cols["images"]):
            row.extend(extra)
        columns += sam_cols["titles"]
    shown = sorted({int(c) for lbl in labels for c in np.unique(lbl) if c < spec.num_classes})
    plot_predictions(grid_rows, columns, chosen, out / "predictions.png", spec,
                     legend_classes=None if spec.num_classes <= 33 else shown)
    sections += ["## Predictions on validation images\n",
                 markdown_header(columns), "![predictions](predictions.png)\n",
                 "Images: " + ", ".join(f"`{sid}`" for sid in chosen) + "\n"]

    atomic_write_bytes(out / "summary.json", json.dumps({"runs": rows, "ids": chosen}, indent=1,
                                                         allow_nan=False, default=str).encode())
    report = out / "report.md"
    atomic_write_bytes(report, "\n".join(sections).encode())
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m segtrain.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (RUN_DIR of segtrain/train.py)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--data", help="validation data (default: the first run's val data)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--ids", nargs="+", help="val image ids for the prediction grid")
    ap.add_argument("--num-images", type=int, default=5)
    ap.add_argument("--sam-checkpoint", help="add SAM and SAM-refined columns (segment-anything checkpoint)")
    ap.add_argument("--sam-model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    ap.add_argument("--sam-points-per-side", type=int, default=32,
                    help="SAM's automatic point grid (32 = SAM's default; 8 is ~10x cheaper on a CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mixed-precision", choices=hardware.PRECISIONS, default="auto",
                    help=f"of the runs' predictions: {hardware.PRECISION_HELP}")
    args = ap.parse_args(argv)
    with user_errors():
        report = build_report(args.runs, args.out, args.data, args.split, args.ids, args.num_images,
                              args.sam_checkpoint, args.sam_model_type, args.sam_points_per_side, args.device,
                              args.mixed_precision)
    print(f"report written to {report}")


if __name__ == "__main__":
    main()
