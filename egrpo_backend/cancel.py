"""How a running job learns it should stop after the current iteration.

A cancel is SIGTERM / SIGINT or a `cancel` file in the job folder. `python -m egrpo_backend run`
installs `catch_early_sigterm()` before it imports anything slow, so a SIGTERM that arrives while the
model loads is remembered (not a kill by the default handler) and the CancelFlag made later honours it.
A CancelFlag also holds the job's process lock for its lifetime (job_process.py): while it lives,
the job is provably running in this process, and a second process cannot run the same job.
"""

from __future__ import annotations

import signal
from pathlib import Path

from . import job_process

_early = {"signalled": False}


def _early_handler(*_):
    _early["signalled"] = True


def catch_early_sigterm() -> None:
    """Remember a SIGTERM that arrives before a CancelFlag exists (the job then stops after one iteration)."""
    try:
        signal.signal(signal.SIGTERM, _early_handler)
    except ValueError:  # not the main thread
        pass


class CancelFlag:
    """SIGTERM / SIGINT (also one caught early) or a `cancel` file in the job dir: stop after the current iteration."""

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

    def __bool__(self):
        return self.signalled or self.file.exists()

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
        if self._owns_lock:
            self.lock.release()
