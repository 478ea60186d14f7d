"""Encoded prompts in bounded space (docs/prompts.md): an in-memory LRU over an on-disk LRU.

A policy's encoder turns ONE prompt into a Cond (batch 1, so a prompt's features never depend on the
prompts beside it); the store keeps each result without its padding (trailing all-zero rows of a
sequence, restored on read: exact) in memory up to `memory_bytes`, and on disk in `folder` up to
`disk_bytes`, one safetensors file per prompt named by the hash of (family, prompt). The least
recently used entries go first. A prompt is encoded again only after both caches dropped it: a
resumed job re-encodes what it lost, nothing else. `encoded` counts encoder calls.

This is the seam for any encoder: a policy passes `encode_one(prompt) -> Cond`; `ensure()` encodes
the prompts of the next iterations ahead of use inside the encoder's `session` (the text encoders
on the device for the chunk, off it between chunks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from .base import Cond

Row = tuple[dict[str, torch.Tensor], dict[str, int]]  # (tensors without the batch dim, trimmed, full lengths)


def trim(cond: Cond) -> Row:
    """A batch-1 Cond as rows without trailing all-zero sequence rows (the padding of zero-padded encoders)."""
    tensors, lengths = {}, {}
    for key, value in cond.items():
        row = value[0].detach().to("cpu")
        if row.ndim >= 2 and row.shape[0] > 1:
            nonzero = (row.reshape(row.shape[0], -1) != 0).any(1).nonzero()
            keep = int(nonzero[-1]) + 1 if nonzero.numel() else 0
            if keep < row.shape[0]:
                lengths[key] = int(row.shape[0])
                row = row[:keep]
        tensors[key] = row.contiguous().clone()
    return tensors, lengths


def untrim(row: Row) -> Cond:
    """The batch-1 Cond a Row was made from, padding restored."""
    tensors, lengths = row
    out = {}
    for key, value in tensors.items():
        full = lengths.get(key)
        if full is not None and full > value.shape[0]:
            value = torch.cat([value, value.new_zeros(full - value.shape[0], *value.shape[1:])])
        out[key] = value.unsqueeze(0)
    return out


def _nbytes(row: Row) -> int:
    return sum(t.numel() * t.element_size() for t in row[0].values())


class CondStore:
    def __init__(self, encode_one: Callable[[str], Cond], family: str, *, folder: str | Path | None = None,
                 disk_bytes: float = 0, memory_bytes: float = 2 * 2**30, max_memory_entries: int | None = None,
                 max_disk_entries: int | None = None, session: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.encode_one, self.family, self.session = encode_one, family, session or contextlib.nullcontext
        self.memory_bytes, self.max_memory = memory_bytes, max_memory_entries
        self.disk_bytes, self.max_disk = disk_bytes, max_disk_entries
        self.folder = Path(folder) if folder and (disk_bytes > 0 and (max_disk_entries is None or max_disk_entries > 0)) else None
        self.memory: OrderedDict[str, Row] = OrderedDict()
        self.memory_used = 0
        self.disk: OrderedDict[str, int] = OrderedDict()  # file hash -> bytes, least recently used first
        self.disk_used = 0
        self.encoded = 0  # encoder calls since this store was made
        if self.folder is not None:
            self._scan()

    # --- lookup -----------------------------------------------------------------------------------
    def _hash(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.family}\0{prompt}".encode("utf-8")).hexdigest()

    def _file(self, h: str) -> Path:
        return self.folder / h[:2] / f"{h}.safetensors"

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.memory or (self.folder is not None and self._hash(prompt) in self.disk)

    def missing(self, prompts) -> list[str]:
        """The prompts (once each, in order) that neither cache holds."""
        return [p for p in dict.fromkeys(prompts) if p not in self]

    def get(self, prompt: str) -> Cond:
        """prompt -> Cond of batch 1 on the CPU: from memory, else from disk, else encoded now."""
        row = self.memory.get(prompt)
        if row is not None:
            self.memory.move_to_end(prompt)
            return untrim(row)
        row = self._read(prompt)
        if row is None:
            row = trim(self.encode_one(prompt))
            self.encoded += 1
            self._write(prompt, row)
        self._remember(prompt, row)
        return untrim(row)

    def ensure(self, prompts, progress: Callable[[int, int], None] | None = None) -> int:
        """Encode every prompt neither cache holds, inside one encoder session; returns how many."""
        todo = self.missing(prompts)
        if not todo:
            return 0
        with self.session():
            for i, p in enumerate(todo):
                self.get(p)
                if progress is not None:
                    progress(i + 1, len(todo))
        return len(todo)

    # --- memory ------------------------------------------------------------------------------------
    def _remember(self, prompt: str, row: Row) -> None:
        self.memory[prompt] = row
        self.memory_used += _nbytes(row)
        while self.memory and (self.memory_used > self.memory_bytes or
                               (self.max_memory is not None and len(self.memory) > self.max_memory)):
            _, old = self.memory.popitem(last=False)
            self.memory_used -= _nbytes(old)

    # --- disk --------------------------------------------------------------------------------------
    def _scan(self) -> None:
        """The entries a previous run left, oldest use first (file mtimes record the last use)."""
        found = []
        if self.folder.is_dir():
            for sub in os.scandir(self.folder):
                if sub.is_dir(follow_symlinks=False) and len(sub.name) == 2:
                    for e in os.scandir(sub.path):
                        if e.name.endswith(".safetensors") and e.is_file(follow_symlinks=False):
                            st = e.stat()
                            found.append((st.st_mtime_ns, e.name[:-12], st.st_size))
        for _, h, size in sorted(found):
            self.disk[h] = size
            self.disk_used += size
        self._evict()

    def _read(self, prompt: str) -> Row | None:
        if self.folder is None:
            return None
        h = self._hash(prompt)
        if h not in self.disk:
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self._file(h)), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("prompt") != prompt or meta.get("family") != self.family:
                    return None
                row = ({k: f.get_tensor(k) for k in f.keys()}, json.loads(meta.get("lengths", "{}")))
            os.utime(self._file(h))  # least recently used is judged by mtime across runs
        except (OSError, ValueError, json.JSONDecodeError):
            self._drop(h)  # damaged or gone: encode again
            return None
        self.disk.move_to_end(h)
        return row

    def _write(self, prompt: str, row: Row) -> None:
        if self.folder is None:
            return
        from ..atomic import atomic_save_safetensors

        h = self._hash(prompt)
        path = self._file(h)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(row[0], path, {"prompt": prompt, "family": self.family, "lengths": json.dumps(row[1])})
        size = path.stat().st_size
        self.disk_used += size - self.disk.pop(h, 0)
        self.disk[h] = size
        self._evict()

    def _evict(self) -> None:
        while self.disk and (self.disk_used > self.disk_bytes or (self.max_disk is not None and len(self.disk) > self.max_disk)):
            self._drop(next(iter(self.disk)))

    def _drop(self, h: str) -> None:
        self.disk_used -= self.disk.pop(h, 0)
        with contextlib.suppress(OSError):
            self._file(h).unlink()

    def files_on_disk(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.safetensors")) if self.folder is not None else 0
