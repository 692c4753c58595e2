"""benchmarks/gpu_check.py, run at its QUICK sizes on this machine's CPU: the script a lent GPU runs works.

A GPU session has about 15 minutes of device time and must not spend it debugging; this test runs
every check of the script here (on the CPU, the two-process check with gloo) and reads its outputs.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"precision", "resume", "sampling", "preflight", "nccl"}


def test_gpu_check_runs_at_quick_sizes_and_writes_its_report(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # the script finds the working tree's coursekit itself
    )
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0, "a check failed at QUICK sizes on the CPU"
    report = json.loads((out / "gpu_check.json").read_text())
    checks = {check["name"]: check for check in report["checks"]}
    assert set(checks) == CHECKS
    assert all(check["status"] == "passed" for check in checks.values()), checks
    assert report["quick"] is True and report["machine"]["device"] == "cpu"
    precision = checks["precision"]["figures"]
    assert {"fp32", "bf16", "seconds"} == set(precision)  # fp16 needs CUDA
    assert all(figures["images_per_second"] > 0 for figures in _runs(precision))
    # the CPU repeats itself exactly: a resumed run ends bit for bit where an uninterrupted one does
    assert all(f["resumed_difference"] == 0 == f["repeat_difference"] for f in _runs(checks["resume"]["figures"]))
    assert set(checks["sampling"]["figures"]) >= {"ddpm", "ddim", "dpm++2m"}
    assert checks["nccl"]["figures"]["backend"] == "gloo"
    table = (out / "gpu_check.md").read_text()
    assert "| check | result | figures |" in table
    for name in CHECKS:
        assert f"| {name} | passed |" in table


def test_gpu_check_refuses_a_budget_that_is_not_positive(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--budget-minutes", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "--budget-minutes must be positive" in result.stderr


def _runs(figures: dict) -> list[dict]:
    return [value for key, value in figures.items() if isinstance(value, dict)]
