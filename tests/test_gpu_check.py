"""The GPU check script (`make gpu-check`) runs end to end, here on CPU with tiny sizes, so that it
does not rot between the rare runs on a machine with a GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--device", "cpu", "--quick", "--skip-tests", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert {row["backend"] for row in report["ops"]} >= {"torch"}
    assert {row["setting"] for row in report["end_to_end"]} == {"speed 0", "half exit at layer 1"}
    assert all(row["patched_ms"] > 0 and row["unpatched_ms"] > 0 for row in report["end_to_end"])
    per_layer = report["per_layer"]
    # The input check's one read, plus at most one per layer that ran a branch.
    assert per_layer["adaptive_host_syncs_per_branch_layer"] <= 1
    serving = report["serving"]
    assert serving["engine_per_s"] > 0 and 0 < serving["engine_batch_fill"] <= 1
    assert (tmp_path / "gpu_check_cpu.md").read_text().startswith("# GPU check")
