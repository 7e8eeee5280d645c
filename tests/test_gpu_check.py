"""The GPU check (`benchmarks/gpu_check.py`): its stage runner, and a CPU smoke run of every stage
that can run without a GPU, so that the script does not rot between the rare runs on a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_a_failing_stage_does_not_stop_the_next(gpu_check, tmp_path):
    """A stage that raises is reported with its error, the next still runs, and the report on disk
    already holds the first stage once the first stage ends."""
    seen_on_disk = {}

    def boom(context):
        raise RuntimeError("the build broke")

    def fine(context):
        seen_on_disk.update(json.loads((tmp_path / "gpu_check.json").read_text())["stages"])
        return {"value": 1}

    stages = [gpu_check.Stage("boom", 10, 0, boom), gpu_check.Stage("fine", 10, 0, fine)]
    context = gpu_check.StageContext(tmp_path, "cpu", True, 1, deadline=time.monotonic() + 60)
    report = gpu_check.run_stages(stages, context, in_process=True)
    assert report["stages"]["boom"]["status"] == "failed"
    assert "the build broke" in report["stages"]["boom"]["error"]
    assert report["stages"]["fine"] == {**report["stages"]["fine"], "status": "passed", "value": 1}
    assert seen_on_disk["boom"]["status"] == "failed"
    assert "| boom | failed |" in (tmp_path / "gpu_check.md").read_text()


def test_floors_keep_time_for_later_stages(gpu_check, tmp_path):
    """Under a 9-second deadline a stage capped at 100 s gets what is left after the later
    stages' floors; a stage that uses its whole budget leaves the last one no time, and that one
    is skipped with the reason, not run."""
    budgets = {}

    def record(name, sleep: bool = False):
        def run(context):
            budgets[name] = context.remaining()
            if sleep:
                time.sleep(context.remaining())
            return {}

        return run

    stages = [
        gpu_check.Stage("greedy", 100, 0, record("greedy")),
        gpu_check.Stage("kept", 7, 5, record("kept", sleep=True)),
        gpu_check.Stage("starved", 10, 0, record("starved")),
    ]
    context = gpu_check.StageContext(tmp_path, "cpu", True, 1, deadline=time.monotonic() + 9)
    report = gpu_check.run_stages(stages, context, in_process=True)
    assert budgets["greedy"] <= 4.1  # 9 s less the 5 s floor kept for the stage after it
    assert 6 <= budgets["kept"] <= 7.1
    assert "starved" not in budgets
    assert report["stages"]["starved"]["status"] == "skipped"
    assert "no time left" in report["stages"]["starved"]["reason"]


def test_a_hanging_command_is_killed_and_its_output_kept(gpu_check, tmp_path):
    with open(tmp_path / "log", "w") as log:
        command = [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"]
        status = gpu_check._run_logged(command, log, timeout=2)
    assert status["timed_out"] and status["seconds"] < 30
    text = (tmp_path / "log").read_text()
    assert "started" in text and "killed after 2 s" in text


def test_smoke_run_on_cpu(gpu_check, tmp_path):
    """The whole command on CPU at tiny sizes: the GPU-only stages say why they skip, every other
    stage runs in its own process and reports."""
    code = gpu_check.main(["--device", "cpu", "--quick", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == [stage.name for stage in gpu_check.STAGES]
    for name in ("build", "tests"):
        assert stages[name]["status"] == "skipped" and stages[name]["reason"]
    assert stages["sanitizer"]["status"] == "skipped"
    for name in ("environment", "kernels", "end_to_end"):
        assert stages[name]["status"] == "passed", stages[name]
    assert code == 0
    assert stages["environment"]["tools"].keys() == set(gpu_check.TOOLS)
    kernels = stages["kernels"]["rows"]
    assert {row["backend"] for row in kernels} >= {"torch"}
    assert all(row["median_ms"] > 0 and "error" not in row for row in kernels)
    e2e = stages["end_to_end"]
    assert {row["setting"] for row in e2e["end_to_end"]} == {"speed 0", "half exit at layer 1"}
    for row in e2e["end_to_end"]:
        assert row["patched_ms"] > 0 and row["baselines_ms"]["padded fp32"] > 0
        assert row["best_baseline"] in row["baselines_ms"]
    assert any("length buckets fp32" in row["baselines_ms"] for row in e2e["end_to_end"])
    # The input check's one read, plus at most one per layer that ran a branch.
    assert e2e["per_layer"]["adaptive_host_syncs_per_branch_layer"] <= 1
    serving = e2e["serving"]
    assert serving["engine_per_s"] > 0 and 0 < serving["engine_batch_fill"] <= 1
    assert {p.name for p in tmp_path.iterdir()} <= set(gpu_check.REPORT_FILES)
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")


def test_sanitizer_workload_runs_on_cpu(gpu_check, backend, device):
    """What compute-sanitizer runs on a GPU, here on every backend present (awkward shapes, N = 0)."""
    assert gpu_check.sanitizer_workload(backend, str(device)) == 0
