"""bench/gpu_check.sh, the one-call GPU check, in its CPU mode: so the script cannot rot between GPU runs."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segtrain import hardware

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


def import_gpu_check():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_check


CPU = import_gpu_check().CPU  # the sizes the CPU mode runs: the rows expected below follow from them
TIME_LIMIT_SKIP = "skipped: the section's time limit was reached"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc = run_check(out, "--cpu", timeout=int(CPU.budget_s) + 120)
    return out, proc


def skip_if_cut_short_on_a_loaded_machine(sections: dict) -> None:
    """A section that ran out of time proves nothing either way when the machine is loaded (shared CPUs:
    the limits are several times an idle run's seconds): skip, naming them. On an idle machine it is a
    hang or a slowdown, and fails. Any other error fails in the assertions below."""
    short = [name for name, s in sections.items()
             if s["status"] == "skipped" or "timed out after" in s.get("error", "")
             or any(r.get("error") == TIME_LIMIT_SKIP for r in s["rows"])]
    load = max(os.getloadavg())
    if short and load >= (os.cpu_count() or 1):
        pytest.skip(f"section(s) {', '.join(short)} ran out of time with a load average of {load:.1f}")


def test_cpu_mode_runs_every_section_and_writes_figures(cpu_run):
    out, proc = cpu_run
    assert (out / "gpu_check.json").exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    skip_if_cut_short_on_a_loaded_machine(json.loads((out / "gpu_check.json").read_text())["sections"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # What the GPU machine sends back: at most 8 plain files, directly under OUT_DIR.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["env", "data", "peak", "model", "train", "syncs", "plain", "eval", "sam", "compile"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ok")

    env = sections["env"]["rows"][0]
    assert env["torch"] and env["cpus"] >= 1 and re.match(r"\d{4}-\d\d-\d\d", env["date_utc"])
    peak = {r["dtype"]: r for r in sections["peak"]["rows"]}
    positive(peak["bfloat16"], "tflop_s", "ms")

    steps = {(r["batch"], r["mode"]): r for r in sections["model"]["rows"]}
    assert set(steps) == model_rows_expected() and len(CPU.batches) >= 2
    for row in steps.values():
        positive(row, "s_per_step", "images_per_s", "peak_mem_mb", "gflop_per_image", "tflop_s", "mfu")
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["s_per_step"])
    # FLOPs come from the counter and grow with the model's input: per image, equal at both batches.
    first, last = CPU.batches[0], CPU.batches[-1]
    assert steps[first, "fp32"]["gflop_per_image"] == pytest.approx(steps[last, "fp32"]["gflop_per_image"], rel=0.02)

    loops = sections["train"]["rows"]
    trained = [r for r in loops if r["loop"] == "segtrain train()"]
    assert [r["batch"] for r in trained][:len(CPU.batches)] == list(CPU.batches)
    emulated_bf16 = not hardware.cpu_bf16_native()[0]  # bf16 runs that no user would make are skipped, saying so
    for row in trained:
        if emulated_bf16 and row["requested"] == "bf16":  # auto picked fp32: the bf16 loop would be emulated
            assert row["error"] == "skipped: bf16 is emulated on this CPU"
            continue
        positive(row, "images_per_s", "steps")
        assert 0 <= row["data_wait_pct"] <= 100 and row["data_wait_ms_per_step"] >= 0
        assert row["precision"] in ("no", "bf16", "fp16")
    positive(next(r for r in loops if r["loop"].startswith("loader alone")), "images_per_s")
    assert [r["batch"] for r in sections["plain"]["rows"]] == list(CPU.batches)
    for row in sections["plain"]["rows"]:
        positive(row, "images_per_s")
    evals = {(r["protocol"], r["precision"]): r for r in sections["eval"]["rows"]}
    assert set(evals) == {(p, q) for p in ("whole", "ms-flip") for q in ("fp32", "bf16")}
    for key, row in evals.items():
        if emulated_bf16 and key == ("ms-flip", "bf16"):
            assert row["error"] == "skipped: bf16 is emulated on this CPU"
        else:
            positive(row, "images_per_s", "images")
    assert len(sections["sam"]["rows"]) == CPU.sam_images
    for row in sections["sam"]["rows"]:
        positive(row, "seconds")
        assert row["masks"] >= 0
    assert sections["compile"]["rows"][0]["error"].startswith("skipped")
    syncs = sections["syncs"]["rows"][0]  # the CUDA check itself is off on a CPU; the steps still run
    assert syncs["loss"] == "ce+weighted_ce+focal+dice+lovasz+ohem" and syncs["result"] == "not checked (no CUDA)"


def model_rows_expected() -> set[tuple[int, str]]:
    """(batch, mode) of the model section: fp32 at every batch, the bf16 modes at the profile's bf16 batches."""
    return {(b, m) for b in CPU.batches for m in ("fp32", "bf16", "bf16+cl") if m == "fp32" or b in CPU.bf16_batches}


def test_cpu_mode_markdown_has_header_goals_and_every_table(cpu_run):
    out, proc = cpu_run
    assert (out / "gpu_check.json").exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    skip_if_cut_short_on_a_loaded_machine(json.loads((out / "gpu_check.json").read_text())["sections"])
    md = (out / "gpu_check.md").read_text()
    for heading in ("# segtrain GPU check (cpu mode)", "## Goals (issue 12)", "## Matrix-product peak",
                    "## Model step (bench/model_bench.py)", "## Training loop", "## Plain fp32 reference-style loop",
                    "## Evaluation", "## SAM automatic mask generation", "## Model step, torch.compile",
                    "## Host-device syncs in training steps"):
        assert heading in md
    assert re.search(r"- date: \d{4}-\d\d-\d\d .*whole run \d+ s", md)
    assert re.search(r"- torch \d+\.\d+", md)
    # The goal lines carry figures computed from this run, e.g. "| 1.17x (1.9 / 1.6) |".
    assert re.search(r"vs plain fp32 loop.*\| >= 2x \| \d+\.\d\dx \(\d+\.\d / \d+\.\d\) \|", md)
    assert re.search(r"\| best MFU \(model step\) \| >= 30% \| \d+\.\d%", md)
    model_rows = [tuple(line.split(" | ")[:2]) for line in md.splitlines()
                  if re.match(r"\| \d+ \| (fp32|bf16|bf16\+cl) \|", line) and "n/a" not in line]
    assert sorted(model_rows) == sorted((f"| {b}", m) for b, m in model_rows_expected())
    log = (out / "gpu_check.log").read_text()
    assert "=== section compile" in log and "# segtrain GPU check" in log


def test_a_small_dev_shm_lowers_loader_workers_with_a_message(monkeypatch):
    gpu_check = import_gpu_check()
    monkeypatch.setattr(gpu_check.shutil, "disk_usage", lambda path: shutil_usage(64 * 2**20))
    profile, message = gpu_check.fit_workers_to_shm(gpu_check.GPU)
    assert profile.workers == 0 and "/dev/shm is 64 MiB" in message and "--shm-size" in message
    monkeypatch.setattr(gpu_check.shutil, "disk_usage", lambda path: shutil_usage(768 * 2**20))
    assert gpu_check.fit_workers_to_shm(dataclasses.replace(gpu_check.GPU, workers=16))[0].workers == 3
    monkeypatch.setattr(gpu_check.shutil, "disk_usage", lambda path: shutil_usage(8 * 2**30))
    assert gpu_check.fit_workers_to_shm(gpu_check.GPU) == (gpu_check.GPU, None)


def shutil_usage(total):
    import shutil
    return shutil._ntuple_diskusage(total, 0, total)


def test_sections_that_use_all_their_time_leave_the_later_ones_their_share(tmp_path, monkeypatch):
    """Every section runs to its limit (the worst case): the last one (compile) still gets its
    share of the budget, not the leftovers of the others."""
    gpu_check = import_gpu_check()
    clock = [1000.0]
    given = {}

    def run_child(name, args, profile, work, timeout):
        given[name] = timeout
        clock[0] += timeout  # uses all of it
        return {"status": "ok", "rows": [], "notes": [], "seconds": timeout}
    monkeypatch.setattr(gpu_check, "run_child", run_child)
    monkeypatch.setattr(gpu_check.time, "time", lambda: clock[0])
    monkeypatch.setattr(gpu_check, "cuda_present", lambda: True)
    gpu_check.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    shares = gpu_check.section_timeouts(list(gpu_check.SECTIONS), gpu_check.GPU.limits, gpu_check.GPU.budget_s)
    assert list(given) == list(gpu_check.SECTIONS)  # none skipped
    for name, seconds in given.items():
        assert shares[name] - 1e-6 <= seconds <= gpu_check.GPU.limits[name], name
    assert sum(given.values()) <= gpu_check.GPU.budget_s + 1e-6


def test_a_failing_section_is_one_line_and_the_next_still_runs(tmp_path, monkeypatch):
    """The driver's handling of a failed section, with the sections run in this process (the
    fresh process per section is what ``cpu_run`` above exercises)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # as for the script: its sections import their benches
    import gpu_check

    def run_here(name, args, profile, work, timeout):
        gpu_check.run_section(name, profile, work, time.time() + timeout)
        return json.loads((work / "results" / f"{name}.json").read_text())
    monkeypatch.setattr(gpu_check, "run_child", run_here)
    # No data section first: train fails on its missing shards; peak, listed after it, must still run.
    code = gpu_check.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--cpu",
                           "--sections", "train,peak"])
    assert code == 1
    sections = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["sections"]
    assert sections["peak"]["status"] == "ok"
    train = sections["train"]
    assert train["status"] == "error" and "\n" not in train["error"]
    assert all("\n" not in r["error"] and "voc-train.json" in r["error"] for r in train["rows"])
    assert "| train | error |" in (tmp_path / "out" / "gpu_check.md").read_text()


def third_party_imports(paths) -> set[str]:
    """Top-level modules imported anywhere in ``paths`` (function-level imports too), stdlib left out."""
    import ast
    local = {"segtrain", "model_bench", "train_bench", "gpu_check"}
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - local - set(sys.stdlib_module_names)


def test_gpu_wheels_package_every_distribution_gpu_check_imports():
    import importlib.metadata as md
    from packaging.requirements import Requirement
    text = (REPO / "bench" / "gpu_wheels.sh").read_text()
    lists = {name: set(re.search(rf"^{name}=\(([^)]*)\)", text, re.M)[1].split()) for name in ("PACKAGES", "IMAGE_HAS")}
    paths = [*sorted((REPO / "segtrain").glob("*.py")),
             *(REPO / "bench" / f for f in ("gpu_check.py", "model_bench.py", "train_bench.py"))]
    # wandb (and google.protobuf, wandb's, for reading its run files): imported only for --tracker
    # wandb, which gpu_check never uses.
    modules = third_party_imports(paths) - {"wandb", "google"}
    by_module = md.packages_distributions()
    wanted = {}
    for module in modules:
        dists = {d.lower() for d in by_module.get(module, [module])}
        wanted[module] = dists
    uncovered = {m: d for m, d in wanted.items() if not d & (lists["PACKAGES"] | lists["IMAGE_HAS"])}
    assert uncovered == {}, f"add to bench/gpu_wheels.sh's PACKAGES (with their run-time dependencies): {uncovered}"
    # And every run-time dependency of a packaged distribution is packaged or in the image.
    for dist in sorted(lists["PACKAGES"]):
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:  # packaged for the GPU image, not installed here (six, tzdata)
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                continue  # an extra, or another platform or Python
            name = req.name.lower().replace("_", "-")
            assert name in lists["PACKAGES"] | lists["IMAGE_HAS"], (dist, text)
