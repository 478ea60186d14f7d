"""How a running job learns it should stop at its next safe point (between two phases of an iteration).

A cancel is SIGTERM / SIGINT or a `cancel` file in the job folder. The signal handler answers at once
with a `cancel_ack` file: the job manager then knows the process is alive and waits for its safe point
however long the phase in flight takes (nodes/job_manager.py kills only a process that never answers).
`python -m egrpo_backend run` installs `catch_early_sigterm()` before it imports anything slow, so a
SIGTERM that arrives while the model loads is remembered (not a kill by the default handler) and the CancelFlag made later honours it.
A CancelFlag also holds the job's process lock for its lifetime (jobs/process.py): while it lives,
the job is provably running in this process, and a second process cannot run the same job.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from . import process as job_process
from .files import open_job_file

ACK_FILE = "cancel_ack"
_early = {"signalled": False, "job_dir": None}


def acknowledge(job_dir) -> None:
    """Write ACK_FILE (the time): the process saw the cancel. Called from signal handlers, so it never raises."""
    if job_dir is None:
        return
    try:
        fd = open_job_file(Path(job_dir) / ACK_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, str(time.time()).encode())
        finally:
            os.close(fd)
    except (OSError, ValueError):
        pass


def _early_handler(*_):
    _early["signalled"] = True
    acknowledge(_early["job_dir"])


def catch_early_sigterm(job_dir=None) -> None:
    """Remember a SIGTERM that arrives before a CancelFlag exists (the job then stops at its first safe point);
    with job_dir, answer it with ACK_FILE (the `--nproc-per-node` parent answers for its ranks this way)."""
    _early["job_dir"] = job_dir
    try:
        signal.signal(signal.SIGTERM, _early_handler)
    except ValueError:  # not the main thread
        pass


class CancelFlag:
    """SIGTERM / SIGINT (also one caught early) or a `cancel` file in the job dir: stop at the next safe point."""

    def __init__(self, job_dir):
        self.lock, self._owns_lock = None, False
        if job_process.holds_lock_here():  # not under a `--nproc-per-node` parent, nor a rank > 0
            self.lock, self._owns_lock = job_process.claim(job_dir)  # raises JobBusy when another process runs the job
        self.file, self.signalled = Path(job_dir) / job_process.CANCEL_FILE, _early["signalled"]
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a server): the file still works
                pass

    def _handle(self, *_):
        self.signalled = True
        acknowledge(self.file.parent)

    def __bool__(self):
        return self.signalled or self.file.exists()

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
        if self._owns_lock:
            self.lock.release()
