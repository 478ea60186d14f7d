"""A checkpoint is one record: checkpoints/iter_NNNNNN/{lora.safetensors, state.pt}.

state.pt holds everything a resume needs, in one dict: the trainer's state (iteration, prompt
cursor, NFE, metrics history, optimizer, RNG), the job runner's state (held-out history) and the
base model's architecture; the LoRA's header carries the spec it was made with (provenance.py). lora.safetensors is a usable
LoRA on its own. The folder is written under a temporary name and renamed whole; latest.json then
names it. Nothing else stores the iteration.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import lora as lora_lib
from .atomic import atomic_write_json
from .config import JobSpec
from .provenance import lora_metadata

KEEP_CHECKPOINTS = 2


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


def save_checkpoint(job_dir, trainer, spec: JobSpec, runner_state: dict) -> Path:
    root = Path(job_dir) / "checkpoints"
    root.mkdir(exist_ok=True)
    name = f"iter_{trainer.state.iteration:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    architecture = getattr(trainer.policy, "architecture", None)
    lora_lib.export_lora(trainer.policy.lora_model(), tmp / "lora.safetensors", "comfy",
                         metadata=lora_metadata(spec, architecture=architecture))
    record = {"trainer": trainer.state_dict(), "runner": runner_state, "architecture": architecture}
    torch.save(record, tmp / "state.pt")
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_json(root / "latest.json", {"name": name})
    for old in sorted(p for p in root.glob("iter_*") if p.name != name)[:-(KEEP_CHECKPOINTS - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's record: {"trainer": ..., "runner": ..., "architecture": ...} (no pickled code runs)."""
    return torch.load(Path(path) / "state.pt", weights_only=True)


def load_checkpoint(path: Path, trainer) -> dict:
    """Restore the LoRA and the trainer from a checkpoint; returns the job runner's state."""
    model = trainer.policy.lora_model()
    tensors, _, _ = lora_lib.read_lora(Path(path) / "lora.safetensors", model=model)
    lora_lib.set_lora_tensors(model, tensors)
    record = read_checkpoint(path)
    trainer.load_state_dict(record["trainer"])
    return record["runner"]
