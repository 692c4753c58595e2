"""Where a submission's code runs: its own process, under limits the operating system enforces.

Two layers, whichever the machine offers:

- **Limits** (always, on Linux and macOS): CPU seconds, memory (data segment), size of any file
  written, open files and, where the grader runs as root, processes; the worker runs as an unprivileged
  user of its own (one per parallel slot), so it cannot signal the grader or another submission.
- **Isolation** with bubblewrap (``apt-get install bubblewrap``): the worker runs in its own user,
  mount, PID, IPC, UTS and network namespaces: no network, a read-only system (only Python, its
  packages and coursekit are visible), an empty ``/tmp``, its own folder as the only writable place,
  no other process in ``/proc``, and no other submission or gradebook in sight.

Without bubblewrap the grader says so once, runs one submission at a time by default, and compares
the places a submission could have written to (the submissions, the gradebook's folder, the temporary
folder, the home folder, the working folder) before and after each run, reporting what changed.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SANDBOX_FOLDER = "/submission"  # where the submission's own folder appears inside bubblewrap
FIRST_UID = 61000  # workers run as FIRST_UID + slot when the grader runs as root
PYTHON = os.path.abspath(sys.executable)  # absolute: the worker starts in another folder (and root)
WATCH_LIMIT = 20_000  # files per watched place, so that a huge home folder cannot stall the grader


@dataclass
class Limits:
    """What one submission may use; the operating system enforces each (``resource.setrlimit``)."""

    question_seconds: int = 60  # wall-clock time for one question's cases
    total_seconds: int = 600  # wall-clock time for the whole submission (and its CPU time)
    memory_mb: int = 4096  # data segment: every tensor and Python object
    file_mb: int = 64  # the largest file it may write
    open_files: int = 256
    processes: int = 64  # threads count too; only enforceable for a user of its own (grader as root)


@dataclass(frozen=True)
class Sandbox:
    """How this machine runs submissions."""

    bwrap: str | None  # the bubblewrap executable, or None when submissions run without isolation
    reason: str  # why there is no isolation (empty when there is)
    own_users: bool = False  # workers run as users of their own (the grader is root and they can run Python)

    @property
    def isolated(self) -> bool:
        return self.bwrap is not None

    def describe(self) -> str:
        if self.isolated:
            return "isolation: bubblewrap (no network, read-only system, own folder only, no other processes)" + (
                "; processes capped by a pids cgroup" if _pids_hierarchy() else ""
            )
        return (
            f"WARNING: grading without isolation ({self.reason}). Submissions still run in a process of their "
            "own under time, memory, file-size and open-file limits, and only their answers run after "
            "being read; but code that got past that could read your files or signal your processes. "
            "Writes outside a submission's folder are looked for after each run and reported. Install "
            "bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) for real isolation."
        )

    def start(self, folder: Path, limits: Limits, slot: int = 0, command: list[str] | None = None) -> subprocess.Popen:
        """Start the worker for the submission in ``folder``; its stdin takes the job, stdout is the channel.

        ``command`` replaces the worker (the tests run hostile code this way, to prove the sandbox holds).
        """
        uid = FIRST_UID + slot if self.own_users else None
        if uid is not None:
            _give_to(folder, uid)
        env = worker_environment(SANDBOX_FOLDER if self.isolated else str(folder))
        command = command or [PYTHON, "-m", "coursekit.course.worker"]
        if self.isolated:
            command = bwrap_command(self.bwrap, folder, env, as_root=_is_root() and uid is None) + command
        group = process_group(limits.processes)
        process = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            user=uid,
            group=uid,
            extra_groups=[] if uid is not None else None,
            preexec_fn=lambda: apply_limits(limits, own_user=uid is not None, group=group),
        )
        process.process_group = group  # removed by release() once the worker is gone
        return process


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _own_users_work() -> bool:
    """Can an unprivileged user of our own run this Python and coursekit? (Not when it lives in /root.)"""
    if not _is_root():
        return False
    try:
        result = subprocess.run(
            [PYTHON, "-c", "import torch, coursekit"],
            capture_output=True,
            timeout=120,
            user=FIRST_UID,
            group=FIRST_UID,
            extra_groups=[],
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _give_to(folder: Path, uid: int) -> None:
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, uid, uid)


def apply_limits(limits: Limits, own_user: bool, group: Path | None = None) -> None:
    """Run in the child between fork and exec: the limits hold for the worker and all it starts."""
    if group is not None:  # join the pids cgroup first, so that everything forked later counts
        try:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file limit fails instead of killing
    megabyte = 1024 * 1024
    wanted = [
        (resource.RLIMIT_CPU, limits.total_seconds + 5),
        (resource.RLIMIT_DATA, limits.memory_mb * megabyte),
        (resource.RLIMIT_FSIZE, limits.file_mb * megabyte),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ]
    if own_user and hasattr(resource, "RLIMIT_NPROC"):
        wanted.append((resource.RLIMIT_NPROC, limits.processes))
    for kind, value in wanted:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):  # e.g. macOS refuses RLIMIT_DATA below what is mapped
            pass


def _pids_hierarchy() -> Path | None:
    """A cgroup hierarchy with the pids controller that we may write to (root, usually), or None."""
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            return root
    return None


def process_group(processes: int) -> Path | None:
    """A cgroup of its own capping the worker's processes and threads (pids.max), where the OS offers one.

    RLIMIT_NPROC cannot hold a worker that runs as root's user (the kernel exempts it); a pids cgroup can.
    """
    root = _pids_hierarchy()
    if root is None:
        return None
    for index in range(1000):
        candidate = root / f"coursekit-{os.getpid()}-{index}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError:
            return None
        try:
            (candidate / "pids.max").write_text(str(processes))
        except OSError:
            candidate.rmdir()
            return None
        return candidate
    return None


def release(process: subprocess.Popen) -> None:
    """Remove the worker's cgroup once every process in it has gone."""
    group = getattr(process, "process_group", None)
    if group is None:
        return
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def worker_environment(home: str) -> dict:
    """A clean environment: no secrets of the grader's, one thread, caches inside the submission's folder."""
    import coursekit

    keep = {key: os.environ[key] for key in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT") if key in os.environ}
    return dict(
        keep,
        HOME=home,
        TMPDIR=home,
        PYTHONPATH=str(Path(coursekit.__file__).resolve().parents[1]),
        PYTHONNOUSERSITE="1",
        PYTHONDONTWRITEBYTECODE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MPLBACKEND="Agg",
        MPLCONFIGDIR=home,
        COURSEKIT_QUICK="1",
        COURSEKIT_GRADING="1",
    )


def _python_folders() -> list[str]:
    """The folders the worker needs to read: Python, its packages and coursekit; nothing else."""
    import coursekit

    wanted = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    wanted.add(str(Path(PYTHON).resolve().parents[1]))
    wanted.add(str(Path(coursekit.__file__).resolve().parent))
    for entry in sys.path:
        if entry and ("site-packages" in entry or "dist-packages" in entry) and os.path.isdir(entry):
            wanted.add(entry)
    folders = []
    for folder in sorted({os.path.realpath(path) for path in wanted if path and os.path.isdir(path)}, key=len):
        if folder.startswith("/usr/") or any(folder.startswith(kept + os.sep) for kept in folders):
            continue
        folders.append(folder)
    return folders


def bwrap_command(bwrap: str, folder: Path, env: dict, as_root: bool = False) -> list[str]:
    """bubblewrap's arguments: new namespaces, a read-only system, the folder as the only writable place.

    Started by root without a user of its own (``as_root``), the worker still gets a user namespace in
    which it is an ordinary user with no capabilities.
    """
    command = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if as_root:
        command += ["--unshare-user", "--uid", str(FIRST_UID), "--gid", str(FIRST_UID), "--cap-drop", "ALL"]
    command += ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"):
        if os.path.islink(name):
            command += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            command += ["--ro-bind", name, name]
    command += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]  # before the binds: Python may live in /tmp
    for python_folder in _python_folders():
        command += ["--ro-bind", python_folder, python_folder]
    command += ["--bind", str(folder), SANDBOX_FOLDER, "--chdir", SANDBOX_FOLDER, "--clearenv"]
    for key, value in env.items():
        command += ["--setenv", key, value]
    return command + ["--"]


@cache
def detect(use_bwrap: bool = True) -> Sandbox:
    """bubblewrap when it is installed and can make namespaces here; else the limits alone, with the reason."""
    if not use_bwrap:
        return Sandbox(None, "turned off with --no-isolation", _own_users_work())
    if not sys.platform.startswith("linux"):
        return Sandbox(None, f"bubblewrap needs Linux, this is {sys.platform}")
    own_users = _own_users_work()
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Sandbox(None, "bubblewrap (bwrap) is not installed", own_users)
    with tempfile.TemporaryDirectory(prefix="coursekit-probe-") as folder:
        uid = FIRST_UID if own_users else None
        if uid is not None:
            _give_to(Path(folder), uid)
        env = worker_environment(SANDBOX_FOLDER)
        probe = bwrap_command(bwrap, Path(folder), env, as_root=_is_root() and not own_users)
        try:
            result = subprocess.run(
                probe + [PYTHON, "-c", "import coursekit"], capture_output=True, timeout=60, user=uid, group=uid
            )
        except (OSError, subprocess.SubprocessError) as error:
            return Sandbox(None, f"bubblewrap could not start here ({error})", own_users)
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            return Sandbox(None, f"bubblewrap could not make namespaces here: {detail[0]}", own_users)
    return Sandbox(bwrap, "", own_users)


# ----------------------------------------------------------------------------- without isolation: look afterwards


def snapshot(places: list[Path], skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """(modification time, size) of every file under ``places``, up to WATCH_LIMIT files each."""
    seen = {}
    for place in places:
        count = 0
        for root, folders, files in os.walk(place, onerror=lambda error: None):
            folders[:] = [name for name in folders if not os.path.join(root, name).startswith(skip)]
            for name in files:
                path = os.path.join(root, name)
                if path.startswith(skip):
                    continue
                try:
                    status = os.lstat(path)
                except OSError:
                    continue
                seen[path] = (status.st_mtime_ns, status.st_size)
                count += 1
            if count >= WATCH_LIMIT:
                break
    return seen


def changed_files(before: dict, after: dict) -> list[str]:
    """Files created, changed or deleted between two snapshots."""
    return sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
