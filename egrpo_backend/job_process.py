"""Which process runs a job: an OS lock that process holds, never a bare pid that may be reused.

A run of a job (`python -m egrpo_backend run|resume|train`, or `run_job` called in-process) takes an
exclusive lock (flock) on JOB_DIR/process.lock before it does anything else and holds it until it
ends. The kernel drops the lock however the process ends (exit, crash, SIGKILL, the OOM killer), and
no other process can hold it meanwhile. Hence:

- `job_running(job_dir)`: True exactly while a process runs the job. A pid in status.json that a
  host or container restart handed to another program never makes a job look alive.
- `claim(job_dir)`: a second process that tries to run the same job is refused, naming the first.
- `job_owner(job_dir)`: the pid to signal, only when it is provable. The holder writes its pid, its
  start time and the boot id into the lock file; on Linux the pid counts as the job's only while the
  lock is held AND /proc/PID/stat still shows that start time (a reused pid starts later). Without
  /proc there is no proof: the owner is None and the job is cancelled through its `cancel` file only.
- Without fcntl (Windows) nothing can be locked: `claim` is a no-op and `job_running` is False, so a
  job of a previous server is shown as not running and never signalled (docs/comfyui.md, "Jobs").
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .job_files import open_job_file

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = "process.lock"
CANCEL_FILE = "cancel"
_IMPORTED_AT = time.time()  # fallback "process start" where /proc is missing (imported first thing by __main__)
_HELD: dict[str, "JobLock"] = {}  # job folder -> the lock this process holds on it


class JobBusy(RuntimeError):
    """Another process runs this job; the message names it."""


# --- identity of a process -------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text[text.rfind(")") + 2:].split()  # the name in parentheses may hold spaces


def _start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), or None without /proc."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 is the 20th after "(name)"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def identity(pid: int | None = None) -> dict:
    """{"pid", "start_ticks", "boot_id"} of a process (start/boot are None where /proc is missing)."""
    pid = os.getpid() if pid is None else int(pid)
    return {"pid": pid, "start_ticks": _start_ticks(pid), "boot_id": _boot_id()}


def same_process(ident: dict | None) -> bool:
    """True only when `ident` provably names a live process: same pid, start time and boot (Linux)."""
    if not ident or not ident.get("pid") or ident.get("start_ticks") is None:
        return False
    now = identity(ident["pid"])
    return now["start_ticks"] == ident["start_ticks"] and now["boot_id"] == ident.get("boot_id")


def process_started_at() -> float:
    """When this process started (seconds since the epoch): /proc on Linux, else when this module loaded."""
    ticks = _start_ticks(os.getpid())
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, TypeError):
        return _IMPORTED_AT


# --- the lock --------------------------------------------------------------------------------------
class JobLock:
    """The lock this process holds on one job folder; `release()` (or the process's end) frees it."""

    def __init__(self, job_dir: Path, fd: int | None):
        self.job_dir, self.fd = job_dir, fd

    def release(self) -> None:
        if _HELD.get(str(self.job_dir)) is self:
            del _HELD[str(self.job_dir)]
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


LOCK_HELD_ENV = "EGRPO_LOCK_HELD"  # set by `run --nproc-per-node` for its torchrun children


def holds_lock_here() -> bool:
    """One process per job holds its lock: the `--nproc-per-node` parent, else rank 0 (plain torchrun)."""
    return os.environ.get(LOCK_HELD_ENV) != "1" and os.environ.get("RANK", "0") == "0"


def die_with_parent(parent_pid: int | None = None, parent_marker: bytes | None = None) -> None:
    """Linux: this process gets SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), so the ranks of
    a `--nproc-per-node` job never outlive torchrun, nor torchrun its launching parent. A parent that
    died before the call is caught by checking it afterwards: a wrong pid (or a parent whose command
    line lacks `parent_marker`) ends this process at once. Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return
    except (OSError, AttributeError):
        return
    ppid = os.getppid()
    if parent_pid is not None and ppid != parent_pid:
        os._exit(1)
    if parent_marker is not None:
        try:
            cmdline = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except OSError:
            return
        if parent_marker not in cmdline:
            os._exit(1)


def claim(job_dir, wait: float = 3.0) -> tuple[JobLock, bool]:
    """Take the job's lock for this process. Returns (lock, newly_taken); a lock this process already
    holds is returned as is (newly_taken False). Raises JobBusy when another process runs the job.

    A stale `cancel` request (older than this process: its run ended without reading it) is removed,
    so it cannot stop this run after one iteration. `wait` covers a reader's momentary probe."""
    job_dir = Path(job_dir).resolve()
    held = _HELD.get(str(job_dir))
    if held is not None:
        return held, False
    if fcntl is None:
        lock = _HELD[str(job_dir)] = JobLock(job_dir, None)
        return lock, True
    fd = open_job_file(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # a link here is refused, never truncated
    deadline = time.time() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() >= deadline:
                os.close(fd)
                other = read_identity(job_dir) or {}
                raise JobBusy(f"job {job_dir} is already running in another process (pid {other.get('pid', '?')}); "
                              "cancel it or wait for it to end") from None
            time.sleep(0.05)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**identity(), "started": time.time()}).encode(), 0)
        os.fsync(fd)
    except OSError:  # a full disk: the lock is let go with the descriptor, not held until this process exits
        os.close(fd)
        raise
    cancel = job_dir / CANCEL_FILE
    try:
        if cancel.stat().st_mtime < process_started_at():
            cancel.unlink()
    except FileNotFoundError:
        pass
    lock = _HELD[str(job_dir)] = JobLock(job_dir, fd)
    return lock, True


def job_running(job_dir) -> bool:
    """True while some process holds the job's lock (it runs the job); False without fcntl."""
    path = Path(job_dir) / LOCK_FILE
    if str(Path(job_dir).resolve()) in _HELD:
        return True
    if fcntl is None or not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's shared lock at once
    return False


def read_identity(job_dir) -> dict | None:
    try:
        return json.loads((Path(job_dir) / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None


def job_owner(job_dir) -> int | None:
    """The pid running the job, when provable (lock held and the same process, see module doc); else None."""
    if not job_running(job_dir):
        return None
    ident = read_identity(job_dir)
    return int(ident["pid"]) if same_process(ident) else None


def signal_owner(job_dir, sig: int = signal.SIGTERM) -> bool:
    """Send `sig` to the job's process if it is provably the job's; returns whether a signal went out."""
    pid = job_owner(job_dir)
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


__all__ = ["CANCEL_FILE", "LOCK_FILE", "JobBusy", "JobLock", "claim", "die_with_parent", "identity", "job_owner", "job_running",
           "process_started_at", "read_identity", "same_process", "signal_owner"]
