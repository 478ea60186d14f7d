"""Writing into a job folder safely: never through a link, lines whole or not at all, a full disk named.

- A file or folder of a job (events.jsonl, cancel, status.json, process.lock, lora/, checkpoints/,
  samples/) that is a symbolic link is refused (UnsafeJobFile): a link could send a write outside the
  job folder. Files are opened with O_NOFOLLOW; folders must be real folders inside the job folder.
- `append_line` writes a line with one os.write on an O_APPEND descriptor and cuts the file back to
  its old size when that fails: a reader never sees half a line from it. `repair_torn_tail` cuts a
  half line a crash left (older versions, or a kill inside the kernel's write) before the next append.
- A full disk (ENOSPC, EDQUOT, or the errors torch and safetensors raise on a short write) becomes
  DiskFull (disk_full.py), whose message names the folder, the bytes needed and the bytes free.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..disk_full import DiskFull, free_bytes, is_disk_full  # noqa: F401  (re-exported: job code names them here)

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows: links there need privileges anyway
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_os_write = os.write  # the one write of append_line (tests replace it to simulate a full disk)


class UnsafeJobFile(ValueError):
    """A job file or folder is a link (or leads outside the job folder); the message says what to remove."""


def _refuse_link(path: Path) -> None:
    raise UnsafeJobFile(f"{path} is a symbolic link: job files are never written through links (a link could send "
                        "the write outside the job folder); remove the link and try again")


def open_job_file(path, flags: int, mode: int = 0o644) -> int:
    """os.open without following a link at `path` (UnsafeJobFile if it is one)."""
    path = Path(path)
    try:
        return os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            _refuse_link(path)
        raise


def refuse_link(path) -> Path:
    """`path` itself must not be a link (it may be missing); returns it."""
    path = Path(path)
    if path.is_symlink():
        _refuse_link(path)
    return path


def job_subdir(job_dir, name: str) -> Path:
    """job_dir/name as a real folder inside the job folder (made if missing); a link is refused."""
    path = refuse_link(Path(job_dir) / name)
    try:
        path.mkdir(exist_ok=True)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(job_dir, 4096, f"the folder {name}/") from e
        raise
    if path.resolve().parent != Path(job_dir).resolve():
        raise UnsafeJobFile(f"{path} leads outside its job folder {job_dir}; remove it and try again")
    return path


def repair_torn_tail(fd: int) -> int:
    """Cut a last line without its newline (left by a crash); returns the bytes cut."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    keep, pos = 0, size
    while pos > 0:
        start = max(0, pos - 65536)
        newline = os.pread(fd, pos - start, start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        pos = start
    os.ftruncate(fd, keep)
    return size - keep


def append_line(path, data: bytes, repair: bool = False) -> None:
    """Append one whole line (bytes ending in a newline) to `path`, fsynced, or nothing at all."""
    path = Path(path)
    fd = open_job_file(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        if repair:
            repair_torn_tail(fd)
        size = os.fstat(fd).st_size
        try:
            if _os_write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")  # a partial write means the disk filled meanwhile
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)  # the half line goes; the lines before stay
            except OSError:
                pass
            if is_disk_full(e):
                raise DiskFull(path.parent, len(data), f"a line of {path.name}") from e
            raise
    finally:
        os.close(fd)
