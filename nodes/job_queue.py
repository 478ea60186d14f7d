"""The job manager's waiting line, kept on disk so that a ComfyUI restart restarts it in order.

A FIFO of (job id, command) where command is "run" or "resume". Every change rewrites
JOBS_ROOT/queue.json atomically; `load()` reads it back at start-up (job_manager.JobManager.scan).
"""

from __future__ import annotations

import json
from pathlib import Path

from egrpo_backend.atomic import atomic_write_json

COMMANDS = ("run", "resume")


class JobQueue:
    def __init__(self, path):
        self.path = Path(path)
        self.items: list[tuple[str, str]] = []

    def load(self) -> list[tuple[str, str]]:
        """The saved line (unreadable or malformed entries are skipped); does not change this queue."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        out = []
        for entry in data.get("queue", []) if isinstance(data, dict) else []:
            if isinstance(entry, dict) and isinstance(entry.get("job"), str) and entry.get("command") in COMMANDS:
                out.append((entry["job"], entry["command"]))
        return out

    def _save(self) -> None:
        atomic_write_json(self.path, {"queue": [{"job": j, "command": c} for j, c in self.items]})

    def replace(self, items: list[tuple[str, str]]) -> None:
        """Set the whole line (start-up: the saved line, minus what no longer exists)."""
        self.items = list(items)
        self._save()

    def append(self, job_id: str, command: str) -> int:
        """Add at the end; returns the 1-based position."""
        self.items.append((job_id, command))
        self._save()
        return len(self.items)

    def remove(self, job_id: str) -> bool:
        before = len(self.items)
        self.items = [(j, c) for j, c in self.items if j != job_id]
        if len(self.items) != before:
            self._save()
        return len(self.items) != before

    def popleft(self) -> tuple[str, str]:
        item = self.items.pop(0)
        self._save()
        return item

    def position(self, job_id: str) -> int | None:
        """1-based place in line, or None when not queued."""
        return next((i + 1 for i, (j, _) in enumerate(self.items) if j == job_id), None)

    def __contains__(self, job_id: str) -> bool:
        return self.position(job_id) is not None

    def __len__(self) -> int:
        return len(self.items)
