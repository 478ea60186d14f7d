"""Writing into a job folder safely: never through a link, lines whole or not at all, a full disk named.

- A file or folder of a job (events.jsonl, cancel, status.json, process.lock, lora/, checkpoints/,
  samples/) that is a symbolic link is refused (UnsafeJobFile): a link could send a write outside the
  job folder. Files are opened with O_NOFOLLOW; folders must be real folders inside the job folder.
- `append_line` writes a line with one os.write on an O_APPEND descriptor and cuts the file back to
  its old size when that fails: a reader never sees half a line from it. `repair_torn_tail` cuts a
  half line a crash left (older versions, or a kill inside the kernel's write) before the next append.
- A full disk (ENOSPC, EDQUOT, or the errors torch and safetensors raise on a short write) becomes
  DiskFull, whose message names the folder, the bytes needed and the bytes free.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows: links there need privileges anyway
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# What a short write looks like when the writer does not pass the errno on: torch.save's zip writer
# ("[enforce fail at inline_container.cc:672] . unexpected pos 39424 vs 39316", "basic_ios::clear:
# iostream error", "PytorchStreamWriter failed writing file") and safetensors ("... (os error 28)").
_SHORT_WRITE = ("unexpected pos", "iostream error", "failed writing file", "file write failed",
                "No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_os_write = os.write  # the one write of append_line (tests replace it to simulate a full disk)


class UnsafeJobFile(ValueError):
    """A job file or folder is a link (or leads outside the job folder); the message says what to remove."""


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
