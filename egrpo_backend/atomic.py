"""Write files whole or not at all: a temp file in the same folder, then os.replace.

A crash, a full disk or an exception while serialising leaves the previous file (if any) intact
and no temp file behind. The temp file lives in the destination folder because os.replace is
only atomic within one filesystem; readers (ComfyUI's LoRA list, the job manager tailing a folder)
never see a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .disk_full import DiskFull, is_disk_full

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask once (setting it back at once)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int = 0) -> Iterator[Path]:
    """Yield a temp path next to `path`; on normal exit it replaces `path`, on error it is removed.

    The caller writes the temp path (and may close it) inside the `with` block. A full disk raises
    job_files.DiskFull naming the folder and the bytes needed (`size` when known, else more than
    what was written before the disk filled).
    """
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A hidden name ending in .tmp: ComfyUI's file lists skip it if they look mid-write.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(dest.parent, max(size, 1), dest.name) from e
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # flush to disk before the rename, or a crash can leave an empty file
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file gets the mode any new file gets
        os.replace(tmp, dest)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise DiskFull(dest.parent, max(size, written + 4096), dest.name) from e  # unknown size: a block more at least
        raise
    _fsync_dir(dest.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically (serialised first, so a bad value writes nothing)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors as .safetensors atomically; metadata values must be strings."""
    from safetensors.torch import save_file

    # the tensors, the JSON header (metadata and ~100 bytes per tensor entry) and its 8-byte length
    size = (sum(t.numel() * t.element_size() for t in tensors.values()) + 8 + 100 * len(tensors)
            + len(json.dumps(metadata or {})))
    with atomic_path(path, size) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)
