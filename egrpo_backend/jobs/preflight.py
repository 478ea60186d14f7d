"""What a job needs from this machine, checked before its folder exists (README, "Limits of a spec").

JobSpec.validate checks the values themselves (types, ranges, names, sizes, the LoRA header); this
checks what they point at: the device is there, the model files exist and can be read, output.copy_to
is a folder that can take the LoRA, every prompt passes the rule of the model and of each reward, and
the rewards' weight files are found. A spec that passes both can run and checkpoint; one that fails
leaves nothing behind. The CLI's `train`, the job manager (create_job) and the ComfyUI node all call it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import JobSpec, SpecError
from ..prompt_rules import check_prompt_rules


def preflight(spec: JobSpec, *, check_model_files: bool = True) -> None:
    """Raise SpecError naming the key of the first thing this machine cannot give the job."""
    check_device(spec.train.device)
    if check_model_files:
        check_model(spec)
    check_copy_to(spec)
    check_prompt_rules(spec)  # prompt_rules.py: every prompt of the set, streamed, before any is encoded
    check_reward_files(spec.rewards)


def check_device(device: str) -> None:
    """'cuda' / 'cuda:N' needs CUDA and that GPU here: a job left at "created" helps nobody."""
    if device in ("auto", "cpu"):
        return
    import torch

    if not torch.cuda.is_available():
        raise SpecError(f"train.device = {device!r} but CUDA is not available on this machine; use 'cpu' or 'auto'")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise SpecError(f"train.device = {device!r} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                        "use one of those or 'cuda'")


def _readable_file(key: str, path: Path, what: str) -> None:
    if not path.is_file():
        raise SpecError(f"{key}: {what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise SpecError(f"{key}: {what} {path} cannot be read (permission denied)")


def check_model(spec: JobSpec) -> None:
    """The model files the source loads exist and can be read (the default model is embedded)."""
    m = spec.model
    if m.source == "diffusers":
        index = Path(m.path) / "model_index.json"
        _readable_file("model.path", index, "no diffusers pipeline (model_index.json of a folder saved with "
                       "save_pretrained)")
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise SpecError(f"model.path: {index} is not a readable JSON file ({e})") from None
        if not isinstance(data, dict):
            raise SpecError(f"model.path: {index} holds a {type(data).__name__}, not a diffusers model index")
    elif m.source == "comfy":
        _readable_file("model.path", Path(m.path), "model file")
        if m.comfy.vae:
            _readable_file("model.comfy.vae", Path(m.comfy.vae), "VAE file")
        for path in (m.comfy.clip or {}).get("paths", []):  # the CLIP the job reloads (policies/comfy_clip.py)
            _readable_file("model.comfy.clip.paths", Path(path), "text encoder file")
        if m.comfy.comfy_root and not Path(m.comfy.comfy_root).is_dir():
            raise SpecError(f"model.comfy.comfy_root: ComfyUI folder not found: {m.comfy.comfy_root}")


def check_copy_to(spec: JobSpec) -> None:
    """output.copy_to is a folder (or one that can be made) that can take NAME.safetensors; /dev/null, a
    file, or a folder without write permission is refused now rather than after the whole run."""
    if not spec.output.copy_to:
        return
    folder = Path(spec.output.copy_to)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail
            break
        existing = existing.parent
    if not existing.is_dir():
        what = "is not a folder" if existing == folder else f"cannot be made: {existing} is not a folder"
        raise SpecError(f"output.copy_to = {str(folder)!r} {what}; give a folder the finished LoRA is copied into")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"output.copy_to = {str(folder)!r}: {existing} is not writable; give a folder you can write")
    target = folder / f"{spec.output.name}.safetensors"
    if target.exists() and not target.is_file():
        raise SpecError(f"output.copy_to: {target} exists and is not a plain file; remove it or choose another folder")


def check_reward_files(rewards: list[dict]) -> None:
    """Model-based rewards need weight files; a missing one is named with where it was looked for."""
    try:
        from ..rewards.models.status import reward_status
    except ImportError:  # optional dependencies missing: building the reward reports it
        return
    for i, r in enumerate(rewards):
        if set(r) - {"name", "weight", "reward_dir"}:
            continue  # custom options may name other files: the reward checks those when it is built
        row = next((s for s in reward_status(r.get("reward_dir")) if s["name"] == r["name"]), None)
        if row is not None and not row["found"]:
            raise SpecError(f"rewards[{i}]: reward {r['name']!r} needs {', '.join(row['files'])}, not found in "
                            f"{row['searched']}. {row['hint']}".strip())
