"""The sandbox keeps its promises even for code that got past the screen.

These tests run hostile code directly in the sandbox (``Sandbox.start(command=...)``), the code the
screen would never let through, to prove the second layer on its own: with bubblewrap, no write
outside the folder (libc included), no other process in /proc, no network, no other submission in
sight; without it, the operating-system limits, and writes outside the folder reported afterwards.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coursekit.course.runner import GradeRow, _grade_into
from coursekit.course.sandbox import Limits, Sandbox, _pids_hierarchy, changed_files, detect, release, snapshot

REPOSITORY = Path(__file__).resolve().parents[1]
LIMITS = Limits(question_seconds=20, total_seconds=60, memory_mb=1500)
ISOLATED = detect(True)
needs_bwrap = pytest.mark.skipif(
    not ISOLATED.isolated,
    reason=f"bubblewrap is not usable here ({ISOLATED.reason}); `make test` installs it where it can",
)


def run_inside(sandbox: Sandbox, folder: Path, code: str, limits: Limits = LIMITS) -> tuple[int, str]:
    """Run ``code`` in the sandbox with the submission folder ``folder``; (exit code, what it printed)."""
    process = sandbox.start(folder, limits, command=[sys.executable, "-c", textwrap.dedent(code)])
    try:
        output, errors = process.communicate(b"", timeout=120)
    finally:
        process.kill()
        process.wait()
        release(process)
    return process.returncode, output.decode() + errors.decode()


MARKER = f"/tmp/coursekit-marker-{os.getpid()}"


@pytest.fixture
def folders(tmp_path):
    """A submission's folder, and beside it another student's submission and the gradebook."""
    mine = tmp_path / "mine"
    mine.mkdir()
    other = tmp_path / "other-student"
    other.mkdir()
    (other / "01_forward_process.ipynb").write_text("another student's answers")
    (tmp_path / "grades.csv").write_text("file,total\n")
    Path(MARKER).write_text("the grader's temporary folder")
    yield mine, other, tmp_path
    Path(MARKER).unlink(missing_ok=True)


def test_bubblewrap_is_installed_where_ci_runs():
    if os.environ.get("CI") and sys.platform.startswith("linux"):
        assert ISOLATED.isolated, ISOLATED.reason


@needs_bwrap
def test_a_libc_write_outside_the_folder_fails(folders):
    mine, other, root = folders
    target = root / "escaped-through-libc.txt"
    code, output = run_inside(
        ISOLATED,
        mine,
        f"""
        import ctypes, os
        libc = ctypes.CDLL(None)
        for path in [b"{target}", b"/tmp/escaped.txt", b"/usr/escaped.txt", b"{other}/escaped.txt"]:
            fd = libc.open(path, 0o101, 0o644)
            print(path.decode(), "fd", fd)
        fd = libc.open(b"inside.txt", 0o101, 0o644)
        print("inside fd", fd, libc.write(fd, b"mine", 4))
        """,
    )
    assert code == 0, output
    assert not target.exists() and not (other / "escaped.txt").exists()
    assert not Path("/usr/escaped.txt").exists() and not Path("/tmp/escaped.txt").exists()
    assert (mine / "inside.txt").read_text() == "mine"  # its own folder is writable


@needs_bwrap
def test_no_other_process_is_visible_or_killable(folders):
    mine, _, _ = folders
    code, output = run_inside(
        ISOLATED,
        mine,
        f"""
        import os, signal
        pids = sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
        print("pids", pids)
        try:
            os.kill({os.getpid()}, signal.SIGKILL)
            print("kill: sent")
        except OSError as error:
            print("kill:", type(error).__name__)
        os.kill(-1, signal.SIGKILL)  # everything it may signal: only itself, in its own namespace
        """,
    )
    assert "pids [1, 2]" in output, output  # bubblewrap's init and itself, nothing else
    assert "kill: ProcessLookupError" in output, output  # the grader's PID means nothing inside
    assert Path(f"/proc/{os.getpid()}").exists()  # and we are still here


@needs_bwrap
def test_the_network_is_unreachable(folders):
    mine, _, _ = folders
    code, output = run_inside(
        ISOLATED,
        mine,
        """
        import socket
        results = []
        for address in [("127.0.0.1", 22), ("10.0.0.1", 80), ("1.1.1.1", 53)]:
            s = socket.socket()
            s.settimeout(2)
            results.append(s.connect_ex(address))
        print("connected", any(result == 0 for result in results), results)
        print("interfaces", socket.if_nameindex())
        """,
    )
    assert code == 0, output
    assert "interfaces [(1, 'lo')]" in output, output  # only a loopback of its own, nothing outside
    assert "connected False" in output, output


@needs_bwrap
def test_other_submissions_and_the_gradebook_are_out_of_sight(folders):
    mine, other, root = folders
    code, output = run_inside(
        ISOLATED,
        mine,
        f"""
        import os
        for path in ["{other}/01_forward_process.ipynb", "{root}/grades.csv", "{root}", "{REPOSITORY}/tests"]:
            print(path, os.path.exists(path))
        print("cwd", os.getcwd(), sorted(os.listdir(".")))
        print("marker", os.path.exists("{MARKER}"))
        """,
    )
    assert code == 0, output
    assert " True" not in output, output
    assert "cwd /submission" in output and "marker False" in output  # the grader's /tmp is not its /tmp


@needs_bwrap
def test_a_disk_filler_a_descriptor_hog_and_a_spinner_hit_their_limits(folders):
    mine, _, _ = folders
    limits = Limits(question_seconds=5, total_seconds=3, memory_mb=1500, file_mb=1)
    code, output = run_inside(
        ISOLATED,
        mine,
        """
        import os
        try:
            with open("big.bin", "wb") as file:
                file.write(b"x" * 10_000_000)
        except OSError as error:
            print("file limit:", error.errno, flush=True)
        try:
            fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(100_000)]
        except OSError as error:
            print("open files limit:", error.errno, flush=True)
        while True:
            pass
        """,
        limits,
    )
    assert "file limit: 27" in output and "open files limit: 24" in output, output  # EFBIG, EMFILE
    assert code != 0  # stopped by its CPU limit
    assert (mine / "big.bin").stat().st_size <= 1024 * 1024


@needs_bwrap
def test_a_fork_bomb_ends_with_its_sandbox(folders):
    mine, _, _ = folders
    marker = f"fork-bomb-{os.getpid()}"
    limits = Limits(question_seconds=5, total_seconds=2, memory_mb=1500, processes=32)
    _, output = run_inside(
        ISOLATED,
        mine,
        f"""
        import os, time
        MARKER = "{marker}"
        children = 0
        for _ in range(200):
            try:
                if os.fork() == 0:
                    time.sleep(600)
                    os._exit(0)
                children += 1
            except OSError:
                break
        print("children", children, flush=True)
        while True:
            pass
        """,
        limits,
    )
    survivors = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                survivors.append(entry)
        except OSError:
            continue
    assert survivors == []
    if _pids_hierarchy() is not None:  # a pids cgroup caps it while it runs (as root, RLIMIT_NPROC cannot)
        assert "children " in output and int(output.split("children ")[1].split()[0]) < 32, output


def test_without_isolation_writes_outside_are_reported(tmp_path):
    """The fallback: a libc write outside the folder is not prevented, but it is found and reported."""
    watched = tmp_path / "watched"
    watched.mkdir()
    target = watched / "escaped.txt"

    class Escaping(Sandbox):
        def start(self, folder, limits, slot=0, command=None):
            code = f"import ctypes; libc = ctypes.CDLL(None); libc.close(libc.open(b'{target}', 0o101, 0o644))"
            return super().start(folder, limits, slot, command=[sys.executable, "-c", code])

    sandbox = Escaping(None, "a test without bubblewrap")
    notebook = (Path(__file__).resolve().parents[1] / "solutions" / "01_forward_process.ipynb").read_bytes()
    row = GradeRow(file="x.ipynb", student="x")
    _grade_into(row, Path("01_x.ipynb"), notebook, LIMITS, sandbox, None, 0, [watched], ())
    assert target.exists()
    assert f"a file outside its folder changed while it ran: {target}" in row.error
    assert any(str(target) in item for item in row.review)
    assert "without isolation" in sandbox.describe()


def test_without_isolation_the_limits_still_hold(tmp_path):
    sandbox = Sandbox(None, "a test without bubblewrap")
    limits = Limits(question_seconds=5, total_seconds=3, memory_mb=1500, file_mb=1)
    code, output = run_inside(
        sandbox,
        tmp_path,
        """
        import resource
        file_size, cpu = resource.getrlimit(resource.RLIMIT_FSIZE)[0], resource.getrlimit(resource.RLIMIT_CPU)[0]
        print("limits", file_size, cpu, flush=True)
        while True:
            pass
        """,
        limits,
    )
    assert f"limits {1024 * 1024} 8" in output and code != 0, output


def test_snapshots_see_new_changed_and_deleted_files(tmp_path):
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "changed.txt").write_text("a")
    (tmp_path / "deleted.txt").write_text("a")
    before = snapshot([tmp_path])
    (tmp_path / "changed.txt").write_text("bb")
    (tmp_path / "deleted.txt").unlink()
    (tmp_path / "new.txt").write_text("c")
    assert [Path(p).name for p in changed_files(before, snapshot([tmp_path]))] == [
        "changed.txt",
        "deleted.txt",
        "new.txt",
    ]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_isolation_can_be_turned_off():
    assert not detect(False).isolated and "--no-isolation" in detect(False).reason


def test_make_test_installs_bubblewrap():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "bubblewrap" in makefile
    assert subprocess.run(["make", "-n", "test"], capture_output=True, text=True).returncode == 0


def test_the_worker_python_is_found_from_any_folder():
    from coursekit.course.sandbox import PYTHON

    assert os.path.isabs(PYTHON) and os.access(PYTHON, os.X_OK)
