"""A full disk, named: ENOSPC, EDQUOT, or the errors torch and safetensors raise on a short write become
DiskFull, whose message names the folder, the bytes needed and the bytes free. A leaf: every writer
(atomic writes, job files, cond stores, prompt indexes) imports it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# What a short write looks like when the writer does not pass the errno on: torch.save's zip writer
# ("[enforce fail at inline_container.cc:672] . unexpected pos 39424 vs 39316", "basic_ios::clear:
# iostream error", "PytorchStreamWriter failed writing file") and safetensors ("... (os error 28)").
_SHORT_WRITE = ("unexpected pos", "iostream error", "failed writing file", "file write failed",
                "No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class DiskFull(OSError):
    """No space left where a job writes; str() names the folder and the bytes needed."""

    def __init__(self, folder, needed: int, what: str = "a file"):
        self.folder, self.needed = Path(folder), int(needed)
        self.free = free_bytes(self.folder)
        free = f"; {self.free} bytes ({self.free / 2**20:.1f} MiB) are free there" if self.free is not None else ""
        self.message = (f"disk full: writing {what} in {self.folder} needs {self.needed} bytes "
                        f"({self.needed / 2**20:.1f} MiB){free}; free space there (or move the "
                        "job folder to a larger disk) and resume the job: its last checkpoint is intact")
        super().__init__(errno.ENOSPC, self.message)

    def __str__(self) -> str:
        return self.message


def is_disk_full(error: BaseException) -> bool:
    """Whether a WRITE failed for want of space (only ever asked about an error of a write)."""
    if isinstance(error, OSError) and error.errno in _FULL:
        return True
    return isinstance(error, Exception) and any(m in str(error) for m in _SHORT_WRITE)


def free_bytes(folder) -> int | None:
    """Bytes free for this user where `folder` is (its nearest existing parent), or None if unknown."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize
