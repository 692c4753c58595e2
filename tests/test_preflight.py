"""The workshop pre-flight check: what it reports, and that it says what to fix."""

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from coursekit.cli import main
from coursekit.course import preflight


@pytest.fixture
def roomy_machine(monkeypatch):
    """Plenty of memory and disk, whatever the test machine has free at the moment."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight, "free_memory_gb", lambda: 16.0)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))


def test_the_report_covers_the_machine_data_widgets_and_run_times(roomy_machine):
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    report = preflight.run_preflight("cpu", measure=True)
    assert torch.equal(torch.rand(2), expected)  # the measurement leaves the random state alone
    names = [check.name for check in report.checks]
    assert names == ["python", "torch", "device", "memory", "disk", "data", "models", "widgets", "diffusers"]
    assert report.ready, report.summary()
    assert list(report.estimates) == [notebook.name for notebook in preflight.NOTEBOOKS]
    assert all(minutes > 0 for minutes in report.estimates.values())
    assert report.speed_ratio > 0
    text = report.summary()
    assert "Ready for the course." in text and "03_training" in text and "1438 images" in text


def test_every_notebook_of_the_course_has_an_estimate():
    on_disk = sorted(path.stem for path in (Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
    assert [notebook.name for notebook in preflight.NOTEBOOKS] == on_disk


def test_estimates_scale_with_speed_and_respect_time_budgets():
    here, ratio = preflight.estimate_minutes(
        preflight.REFERENCE_SECONDS_PER_STEP, preflight.REFERENCE_SECONDS_PER_IMAGE_CALL
    )
    assert ratio == pytest.approx(1.0)
    reference = {notebook.name: notebook for notebook in preflight.NOTEBOOKS}
    assert here["04_reverse_process"] == pytest.approx(reference["04_reverse_process"].scaled_seconds / 60)
    # four times slower: the scaled part takes 4x, the training stays within its 4-minute budget
    slow, slow_ratio = preflight.estimate_minutes(
        4 * preflight.REFERENCE_SECONDS_PER_STEP, 4 * preflight.REFERENCE_SECONDS_PER_IMAGE_CALL
    )
    assert slow_ratio == pytest.approx(4.0)
    assert slow["04_reverse_process"] == pytest.approx(4 * here["04_reverse_process"])
    assert slow["03_training"] == pytest.approx(4 * reference["03_training"].scaled_seconds / 60 + 4)
    # a fast GPU trains 03 for its 5000 steps, a fast CPU or Mac for its whole 4-minute budget
    fast, _ = preflight.estimate_minutes(0.005, 1e-6, device_type="cuda")
    assert fast["03_training"] < 1
    fast_cpu, _ = preflight.estimate_minutes(0.005, 1e-6, device_type="mps")
    assert fast_cpu["03_training"] == pytest.approx(4, abs=0.05)  # the budget, plus seconds of the rest
    # 06 trains two models for the same minutes everywhere: even a fast GPU waits its whole budget
    assert fast["06_flow_matching"] == pytest.approx(10, abs=0.1)  # the budget, plus seconds of the rest
    assert slow["06_flow_matching"] == pytest.approx(4 * reference["06_flow_matching"].scaled_seconds / 60 + 10)


def test_a_full_disk_is_reported_with_what_to_do(monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**8, 10**8))
    report = preflight.run_preflight("cpu", measure=False)
    disk = next(check for check in report.checks if check.name == "disk")
    assert not disk.ok and "0.1 GB free" in disk.detail
    assert not report.ready and "FIX  disk" in report.summary()
    assert main(["preflight", "--device", "cpu", "--no-measure"]) == 1
    assert "Fix the lines marked FIX" in capsys.readouterr().out


def test_missing_widgets_say_how_to_get_them(monkeypatch):
    real_find_spec = preflight.importlib.util.find_spec
    monkeypatch.setattr(
        preflight.importlib.util, "find_spec", lambda name: None if name == "ipywidgets" else real_find_spec(name)
    )
    check = preflight.widgets_check()
    assert not check.ok and "pip install ipywidgets" in check.detail


def test_the_command_line_reports_a_ready_machine(roomy_machine, capsys):
    assert main(["preflight", "--device", "cpu", "--no-measure"]) == 0
    assert "Ready for the course." in capsys.readouterr().out
