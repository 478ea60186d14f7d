"""How a running job learns it should stop after the current iteration."""

from __future__ import annotations

import signal
from pathlib import Path


class CancelFlag:
    """SIGTERM / SIGINT or a `cancel` file in the job dir: stop after the current iteration."""

    def __init__(self, job_dir):
        self.file, self.signalled = Path(job_dir) / "cancel", False
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
