"""Everything the pack needs from ComfyUI's own modules, imported lazily and guarded.

The node modules import `comfy_api` (the V3 node API) at module level and nothing else of
ComfyUI; `comfy.*`, `folder_paths` and `server` are reached only through these helpers, so the
node layer imports in CI where those modules are absent or faked. Each helper says what it does
when ComfyUI is not there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("egrpo")

JOBS_SUBDIR = "egrpo_jobs"  # under ComfyUI's output folder
LORA_SUBDIR = "egrpo"  # under the first `loras` folder: listed by the core LoraLoader as egrpo/NAME


def _folder_paths():
    try:
        import folder_paths  # ComfyUI's module

        return folder_paths
    except ImportError:
        return None


def jobs_root() -> Path:
    """$EGRPO_JOBS_DIR, else ComfyUI's output/egrpo_jobs, else ./egrpo_jobs (outside ComfyUI)."""
    if os.environ.get("EGRPO_JOBS_DIR"):
        return Path(os.environ["EGRPO_JOBS_DIR"]).resolve()
    fp = _folder_paths()
    base = Path(fp.get_output_directory()) if fp else Path.cwd()
    return (base / JOBS_SUBDIR).resolve()


def loras_dir() -> Path:
    """Where finished LoRAs are copied: $EGRPO_LORA_DIR, else <first ComfyUI loras folder>/egrpo."""
    if os.environ.get("EGRPO_LORA_DIR"):
        return Path(os.environ["EGRPO_LORA_DIR"]).resolve()
    fp = _folder_paths()
    if fp:
        folders = fp.get_folder_paths("loras")
        if folders:
            return (Path(folders[0]) / LORA_SUBDIR).resolve()
    return (jobs_root().parent / "loras" / LORA_SUBDIR).resolve()


def input_dir() -> Path | None:
    """ComfyUI's input folder (folder_paths.get_input_directory()): the only folder a graph's prompt
    files are read from; $EGRPO_INPUT_DIR replaces it; None outside ComfyUI."""
    if os.environ.get("EGRPO_INPUT_DIR"):
        return Path(os.environ["EGRPO_INPUT_DIR"]).resolve()
    fp = _folder_paths()
    return Path(fp.get_input_directory()).resolve() if fp else None


REWARD_FOLDER = "egrpo_rewards"  # models/egrpo_rewards: reward model weights (see docs/rewards.md)


def reward_dirs() -> list[str]:
    """The folders reward model files are looked up in: ComfyUI's models/egrpo_rewards (registered
    here, so extra_model_paths.yaml can add more), or [] outside ComfyUI."""
    fp = _folder_paths()
    if fp is None:
        return []
    if REWARD_FOLDER not in getattr(fp, "folder_names_and_paths", {}):
        fp.add_model_folder_path(REWARD_FOLDER, os.path.join(fp.models_dir, REWARD_FOLDER))
    return list(fp.get_folder_paths(REWARD_FOLDER))


def lora_folders() -> list[str]:
    """ComfyUI's loras folders (models/loras and extra_model_paths.yaml's), or [] outside ComfyUI."""
    fp = _folder_paths()
    return [str(p) for p in fp.get_folder_paths("loras")] if fp else []


def lora_files() -> list[tuple[str, str]]:
    """(name as LoraLoader lists it, full path) of every file in ComfyUI's loras folders; [] outside ComfyUI."""
    fp = _folder_paths()
    if fp is None:
        return []
    out = []
    for name in fp.get_filename_list("loras"):
        path = fp.get_full_path("loras", name)
        if path:
            out.append((name, path))
    return out


def comfy_root() -> str:
    """ComfyUI's root folder (where main.py and comfy/ live), or '' outside ComfyUI."""
    fp = _folder_paths()
    return str(Path(fp.__file__).resolve().parent) if fp else ""


def send_event(event: str, data: dict) -> None:
    """Forward to every browser over ComfyUI's websocket (thread-safe); a no-op outside ComfyUI."""
    try:
        from server import PromptServer
    except ImportError:
        return
    inst = getattr(PromptServer, "instance", None)
    if inst is not None:
        inst.send_sync(event, data)


def prompt_server_routes():
    """ComfyUI's aiohttp RouteTableDef, or None outside a running server."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    inst = getattr(PromptServer, "instance", None)
    return getattr(inst, "routes", None)


class _NoProgress:
    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        pass

    def update(self, value):
        pass


def progress_bar(total: int):
    """comfy.utils.ProgressBar (drives the node's bar in the UI), or a silent stand-in."""
    try:
        import comfy.utils

        return comfy.utils.ProgressBar(total)
    except ImportError:
        return _NoProgress(total)


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException after POST /interrupt (Cancel in the UI)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def patcher_source(obj) -> dict:
    """Where a core loader got a MODEL / CLIP / VAE from, as recorded in `cached_patcher_init`.

    Returns {"loader": function name, "paths": [files], "args": positional args} or {} when the
    object carries no record (custom loaders, older ComfyUI).
    """
    patcher = getattr(obj, "patcher", obj)
    init = getattr(patcher, "cached_patcher_init", None)
    if not init:
        return {}
    fn, args = init[0], init[1]
    paths = []
    for a in args:
        if isinstance(a, str) and os.path.isfile(a):
            paths.append(a)
        elif isinstance(a, (list, tuple)) and all(isinstance(x, str) for x in a):
            paths.extend(x for x in a if os.path.isfile(x))
    return {"loader": getattr(fn, "__name__", str(fn)), "paths": paths, "args": args}
