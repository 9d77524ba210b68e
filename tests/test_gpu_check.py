"""bench/gpu_check.sh, the one-call GPU check, in its CPU mode: so the script cannot rot between GPU runs."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def run_check(out: Path, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), str(out), *flags], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row.get(key)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, row)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc = run_check(out, "--cpu")
    return out, proc


def test_cpu_mode_runs_every_section_and_writes_figures(cpu_run):
    out, proc = cpu_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # What the GPU machine sends back: at most 8 plain files, directly under OUT_DIR.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["env", "data", "peak", "model", "train", "plain", "eval", "sam", "compile"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ok")

    env = sections["env"]["rows"][0]
    assert env["torch"] and env["cpus"] >= 1 and re.match(r"\d{4}-\d\d-\d\d", env["date_utc"])
    peak = {r["dtype"]: r for r in sections["peak"]["rows"]}
    positive(peak["bfloat16"], "tflop_s", "ms")

    steps = {(r["batch"], r["mode"]): r for r in sections["model"]["rows"]}
    assert set(steps) == {(b, m) for b in (2, 4) for m in ("fp32", "bf16", "bf16+cl")}
    for row in steps.values():
        positive(row, "s_per_step", "images_per_s", "peak_mem_mb", "gflop_per_image", "tflop_s", "mfu")
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["s_per_step"])
    # FLOPs come from the counter and grow with the model's input: per image, equal at both batches.
    assert steps[2, "fp32"]["gflop_per_image"] == pytest.approx(steps[4, "fp32"]["gflop_per_image"], rel=0.02)

    loops = sections["train"]["rows"]
    trained = [r for r in loops if r["loop"] == "segtrain train()"]
    assert [r["batch"] for r in trained][:2] == [2, 4]
    for row in trained:
        positive(row, "images_per_s", "steps")
        assert 0 <= row["data_wait_pct"] <= 100 and row["data_wait_ms_per_step"] >= 0
        assert row["precision"] in ("no", "bf16", "fp16")
    positive(next(r for r in loops if r["loop"].startswith("loader alone")), "images_per_s")
    for row in sections["plain"]["rows"]:
        positive(row, "images_per_s")
    evals = {(r["protocol"], r["precision"]): r for r in sections["eval"]["rows"]}
    assert set(evals) == {(p, q) for p in ("whole", "ms-flip") for q in ("fp32", "bf16")}
    for row in evals.values():
        positive(row, "images_per_s", "images")
    for row in sections["sam"]["rows"]:
        positive(row, "seconds")
        assert row["masks"] >= 0
    assert sections["compile"]["rows"][0]["error"].startswith("skipped")


def test_cpu_mode_markdown_has_header_goals_and_every_table(cpu_run):
    out, _ = cpu_run
    md = (out / "gpu_check.md").read_text()
    for heading in ("# segtrain GPU check (cpu mode)", "## Goals (issue 12)", "## Matrix-product peak",
                    "## Model step (bench/model_bench.py)", "## Training loop", "## Plain fp32 reference-style loop",
                    "## Evaluation", "## SAM automatic mask generation", "## Model step, torch.compile"):
        assert heading in md
    assert re.search(r"- date: \d{4}-\d\d-\d\d .*whole run \d+ s", md)
    assert re.search(r"- torch \d+\.\d+", md)
    # The goal lines carry figures computed from this run, e.g. "| 1.17x (1.9 / 1.6) |".
    assert re.search(r"vs plain fp32 loop.*\| >= 2x \| \d+\.\d\dx \(\d+\.\d / \d+\.\d\) \|", md)
    assert re.search(r"\| best MFU \(model step\) \| >= 30% \| \d+\.\d%", md)
    model_rows = [line for line in md.splitlines() if re.match(r"\| [24] \| (fp32|bf16|bf16\+cl) \|", line)]
    assert len(model_rows) == 6 and all("n/a" not in line for line in model_rows)
    log = (out / "gpu_check.log").read_text()
    assert "=== section compile" in log and "# segtrain GPU check" in log


def test_a_failing_section_is_one_line_and_the_next_still_runs(tmp_path):
    # No data section first: train fails on its missing shards; peak, listed after it, must still run.
    proc = run_check(tmp_path / "out", "--cpu", "--sections", "train,peak", timeout=300)
    assert proc.returncode == 1
    sections = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["sections"]
    assert sections["peak"]["status"] == "ok"
    train = sections["train"]
    assert train["status"] == "error" and "\n" not in train["error"]
    assert all("\n" not in r["error"] and "voc-train.json" in r["error"] for r in train["rows"])
    assert "| train | error |" in (tmp_path / "out" / "gpu_check.md").read_text()
