"""A checkpoint is one record: checkpoints/iter_NNNNNN/{lora.safetensors, state.pt}.

state.pt holds everything a resume needs, in one dict: the trainer's state (iteration, prompt
cursor, NFE, metrics history, optimizer, RNG; with algorithm.loss "nft" also the old-policy
copy of the LoRA, nft_update.NFTUpdate.state_dict), the job runner's state (held-out history) and the
base model's architecture; the LoRA's header carries the spec it was made with (provenance.py). lora.safetensors is a usable
LoRA on its own. The folder is written under a temporary name and renamed whole; latest.json then
names it. Nothing else stores the iteration.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from .. import distributed
from .. import lora as lora_lib
from ..atomic import atomic_path, atomic_write_json
from .files import DiskFull, is_disk_full, job_subdir
from ..config import JobSpec
from ..provenance import lora_metadata

KEEP_CHECKPOINTS = 2


class CheckpointError(RuntimeError):
    """A checkpoint is damaged, foreign or unusable; the message names the file and the way out."""


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is unusable: {why}. Delete that folder to resume from the previous "
                           "checkpoint, or start a new job")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def latest_checkpoint(job_dir) -> Path | None:
    info = _read_json(Path(job_dir) / "checkpoints" / "latest.json")
    if not info:
        return None
    path = Path(job_dir) / "checkpoints" / info["name"]
    return path if (path / "state.pt").exists() else None


def save_checkpoint(job_dir, trainer, spec: JobSpec, runner_state: dict) -> Path | None:
    """Every rank calls this (FSDP2 gathers the LoRA and optimizer shards); rank 0 alone writes and
    gets the checkpoint's folder, the others None."""
    lora, trainer_state = lora_lib.lora_tensors(trainer.policy.lora_model()), trainer.state_dict()
    if not distributed.is_writer():
        return None
    root = job_subdir(job_dir, "checkpoints")
    name = f"iter_{trainer.state.iteration:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    architecture = getattr(trainer.policy, "architecture", None)
    record = {"trainer": trainer_state, "runner": runner_state, "architecture": architecture}
    try:
        tmp.mkdir()
        lora_lib.export_lora(lora, tmp / "lora.safetensors", "comfy", metadata=lora_metadata(spec, architecture=architecture),
                             naming="own")  # the model's own module names: what a resume loads back
        with atomic_path(tmp / "state.pt", _tensor_bytes(record)) as part:  # fsynced before the folder is renamed into place
            torch.save(record, part)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a half checkpoint would only hold space a full disk lacks
        if is_disk_full(e):  # named for the checkpoints folder (the temp folder is gone), with both files' bytes
            needed = _tensor_bytes(record) + sum(_tensor_bytes([t.down, t.up]) for t in lora.values()) + 16384
            raise DiskFull(root, needed, f"checkpoint {name} (lora.safetensors and state.pt)") from e
        raise
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_json(root / "latest.json", {"name": name})
    for old in sorted(p for p in root.glob("iter_*") if p.name != name)[:-(KEEP_CHECKPOINTS - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _tensor_bytes(value) -> int:
    """The bytes of the tensors in a (nested) record: what torch.save needs at least (DiskFull says it)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's record: {"trainer": ..., "runner": ..., "architecture": ...} (no pickled code runs)."""
    try:
        record = torch.load(Path(path) / "state.pt", weights_only=True)
    except Exception as e:  # a damaged file can fail anywhere in the unpickler (IndexError, KeyError, ...)
        raise _damaged(path, f"state.pt cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(record, dict) or not {"trainer", "runner"} <= set(record):
        raise _damaged(path, "state.pt is not an E-GRPO checkpoint record")
    return record


def read_checkpoint_lora(path: Path, model=None) -> dict:
    """The checkpoint's LoRA tensors, checked to be finite (a NaN LoRA is never worth loading or sharing)."""
    try:
        tensors, _, _ = lora_lib.read_lora(Path(path) / "lora.safetensors", model=model)
    except (SafetensorError, OSError) as e:
        raise _damaged(path, f"lora.safetensors cannot be read ({type(e).__name__}: {e})") from None
    bad = next((name for name, t in tensors.items() if not (torch.isfinite(t.down).all() and torch.isfinite(t.up).all())), None)
    if bad is not None:
        raise _damaged(path, f"its LoRA holds NaN/inf values (first in {bad}): training diverged before it was saved")
    return tensors


def clean_leftovers(job_dir, min_age_s: float = 60.0) -> list[Path]:
    """Remove what a crash left: checkpoints/.tmp-* folders and hidden *.tmp files of atomic writes
    older than `min_age_s` (a write still in flight is never that old)."""
    job_dir, now, removed = Path(job_dir), time.time(), []
    stale = list((job_dir / "checkpoints").glob(".tmp-*")) if (job_dir / "checkpoints").is_dir() else []
    for folder in (job_dir, job_dir / "lora", job_dir / "checkpoints"):
        if folder.is_dir() and not folder.is_symlink():
            stale += [p for p in folder.glob(".*.tmp") if p.is_file()]
    for p in stale:
        if now - p.lstat().st_mtime >= min_age_s:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: Path, trainer) -> dict:
    """Restore the LoRA and the trainer from a checkpoint; returns the job runner's state."""
    model = trainer.policy.lora_model()
    tensors = read_checkpoint_lora(path, model=model)
    lora_lib.set_lora_tensors(model, tensors)
    record = read_checkpoint(path)
    trainer.load_state_dict(record["trainer"])
    return record["runner"]
