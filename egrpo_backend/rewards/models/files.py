"""Where reward weights live on disk, and how they are read without running code from a pickle.

Reward files are found in this order: an explicit `path=` option; else each "reward folder" (the
`reward_dir` option, then the EGRPO_REWARD_DIR environment variable, several folders separated by
os.pathsep). ComfyUI passes its `models/egrpo_rewards/` folder(s) as reward_dir. Nothing here
downloads: a missing file raises RewardFileNotFound naming the files expected, the folders searched
and where people usually get them.

Published checkpoints (.pt / .pth) are torch pickles. They are read only with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers; a file it
refuses raises UnsafeCheckpointError. `convert_to_safetensors` turns an accepted pickle into a
.safetensors file once, so later loads never unpickle.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_VAR = "EGRPO_REWARD_DIR"
COMFY_FOLDER = "models/egrpo_rewards/"  # the folder the ComfyUI pack registers (named in messages only)


class RewardFileNotFound(FileNotFoundError):
    """A reward's weight, config or tokenizer file is not on disk; the message says how to get it."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint that torch.load(weights_only=True) refuses: it may run code when unpickled."""


@dataclass(frozen=True)
class FilePart:
    """One file (or folder) a reward needs: its role, the names it may have, and where to get it."""

    role: str  # e.g. "checkpoint", "tokenizer"
    candidates: tuple[str, ...]  # paths relative to a reward folder, preferred first
    hint: str  # where users usually get it


def reward_dirs(reward_dir: str | os.PathLike | list | tuple | None = None) -> list[Path]:
    """The reward folders to search: the option first, then $EGRPO_REWARD_DIR (os.pathsep-separated)."""
    dirs: list[Path] = []
    options = reward_dir if isinstance(reward_dir, (list, tuple)) else [reward_dir]
    for entry in [*options, os.environ.get(ENV_VAR)]:
        if not entry:
            continue
        for piece in str(entry).split(os.pathsep) if isinstance(entry, str) else [entry]:
            if piece and Path(piece).expanduser() not in dirs:
                dirs.append(Path(piece).expanduser())
    return dirs


def describe_dirs(dirs: list[Path]) -> str:
    if not dirs:
        return (
            f"no reward folder was given (pass reward_dir=..., set {ENV_VAR}, or in ComfyUI put the files "
            f"in {COMFY_FOLDER})"
        )
    return ", ".join(str(d) for d in dirs)


def search(part: FilePart, dirs: list[Path]) -> Path | None:
    """The first existing candidate, trying every folder for each name (so .safetensors beats .pt)."""
    for name in part.candidates:
        for d in dirs:
            p = d / name
            if p.exists():
                return p
    return None


def find_part(part: FilePart, dirs: list[Path], reward: str, given: str | os.PathLike | None = None) -> Path:
    """The path of one part: the explicit `given` path if any (it must exist), else a search of `dirs`."""
    if given is not None:
        p = Path(given).expanduser()
        if not p.exists():
            raise RewardFileNotFound(
                f"reward {reward!r}: the {part.role} {str(p)!r} does not exist. Expected one of: "
                f"{', '.join(part.candidates)}. {part.hint}"
            )
        return p
    found = search(part, dirs)
    if found is None:
        raise RewardFileNotFound(
            f"reward {reward!r}: {part.role} not found. Expected one of: {', '.join(part.candidates)}; "
            f"searched: {describe_dirs(dirs)}. {part.hint}"
        )
    return found


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch pickle read with weights_only=True.

    A pickle holding {'state_dict': ...} (open_clip / HPS training checkpoints) is unwrapped, and a
    'module.' prefix left by DistributedDataParallel is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "TorchScript" not in str(e):
            raise  # a damaged file, not an unsafe one: torch's own message says more
        raise UnsafeCheckpointError(
            f"{str(path)!r} cannot be loaded safely: torch.load(weights_only=True) refused it ({_first_line(e)}). "
            "It is not a plain tensor checkpoint (it may run code when unpickled, or be a TorchScript archive), so "
            "it is not loaded. Use the .safetensors release of this model if there is one, or a checkpoint that "
            "holds only tensors (the published reward files do)."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """Write the tensors of a checkpoint (.pt/.pth, read with weights_only=True) to a .safetensors file.

    dst defaults to src with the suffix .safetensors (the reward loaders prefer that name). The file is
    written to a temporary name and renamed, so an interrupted conversion leaves nothing half-written.
    Keys are kept as they are: the loaders convert key names every time, whatever the container.
    """
    from safetensors.torch import save_file

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    tensors = load_state_dict(src)
    # safetensors refuses tensors that share memory (tied weights); give each its own contiguous copy.
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=str(dst.parent))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"converted_from": src.name})
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dst


def _first_line(e: BaseException) -> str:
    # torch's own message goes on to suggest weights_only=False, which is exactly what we refuse to do
    lines = str(e).strip().splitlines()
    detail = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s+was not|\.\s|$)", " ".join(lines))  # names the refused object
    if detail:
        return "WeightsUnpickler error: " + detail.group(1).strip()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__
