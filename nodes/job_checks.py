"""What a training job would refuse later, checked in E-GRPO Train LoRA before any job folder exists
(the node's own inputs; the spec's values and this machine are egrpo_backend.jobs.preflight's).

The child process validates its spec again, but a mistake found there costs a job folder, a child
start and a failed row in the panel. These checks raise the same complaint at once, as the node's
error, naming the key (or the input) and the fix.
"""

from __future__ import annotations

import json

# Spec keys the node sets from one of its inputs -> that input. spec_overrides may not set them:
# two places for one value would leave one silently ignored.
NODE_KEYS = {
    "model.source": "source", "model.path": "model", "model.comfy.comfy_root": "model",
    "model.comfy.kind": "model", "model.comfy.vae": "vae (or vae_name)", "model.comfy.cond_cache": "clip", "model.comfy.clip": "clip",
    "model.comfy.guidance": "guidance", "model.comfy.width": "width", "model.comfy.height": "height",
    "model.comfy.length": "length", "model.comfy.loras": "model", "model.comfy.lora_dirs": "model",
    "model.comfy.model_sampling": "model",
    "prompts": "prompts", "rewards": "reward", "algorithm.preset": "preset", "algorithm.steps": "steps",
    "algorithm.shift": "shift", "algorithm.eta": "eta", "algorithm.tau": "tau", "algorithm.active": "active",
    "algorithm.group_size": "group_size", "algorithm.clip_range": "clip_range", "lora.rank": "lora_rank",
    "train.iterations": "iterations", "train.prompts_per_iteration": "prompts_per_iteration", "train.lr": "lr",
    "train.seed": "seed", "train.device": "device", "output.name": "name",
}
PLAN_KEYS = {"algorithm.sigmas": "plan", "algorithm.diffusion": "plan"}  # set by a connected plan
SOURCE_ONLY = {"model.family": "diffusers", "model.comfy": "comfy"}  # meaningful for one source only


def parse_overrides(text: str) -> dict:
    """spec_overrides as a dict ({} when blank); the error says what JSON is expected."""
    if not text.strip():
        return {}
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"spec_overrides is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError('spec_overrides must be a JSON object like {"train": {"minibatches": 4}}')
    return extra


def refuse_node_keys(extra: dict, source: str, plan: bool, prefix: str = "") -> None:
    """Every override is applied (merged into the spec, then validated by JobSpec) or refused here by name:
    keys an input of the node sets, and keys the chosen source would ignore."""
    owned = {**NODE_KEYS, **(PLAN_KEYS if plan else {})}
    for k, v in extra.items():
        key = f"{prefix}{k}"
        if key in owned:
            raise ValueError(f"spec_overrides sets {key}, which the node sets from its {owned[key]} input; remove "
                             f"{key} from spec_overrides and set {owned[key]} instead")
        if key in SOURCE_ONLY and SOURCE_ONLY[key] != source:
            raise ValueError(f"spec_overrides sets {key}, which applies to model.source = {SOURCE_ONLY[key]!r} only "
                             f"(this node trains source = {source!r}); remove it")
        if isinstance(v, dict):
            refuse_node_keys(v, source, plan, key + ".")


# Keys a graph may never set: where files are written is the server's choice, not a workflow's.
GRAPH_REFUSED = {"output.copy_to": "the finished LoRA is copied into ComfyUI's loras folder (models/loras/egrpo) "
                                   "by the server; remove output.copy_to from spec_overrides"}
PROMPT_FILE_KEYS = ("prompts", "eval_prompts")


def refuse_graph_keys(extra: dict) -> None:
    """Refuse override keys that would let a graph choose where the server writes (docs/comfyui.md)."""
    for key, why in GRAPH_REFUSED.items():
        node = extra
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            raise ValueError(f"spec_overrides sets {key}, which a graph may not set: {why}")


def resolve_prompt_files(extra: dict, input_dir) -> dict:
    """{"file": NAME} prompt lists in the overrides, resolved inside ComfyUI's input folder only.

    An absolute path or one that leaves the input folder ('..', a link out) is refused: a graph must
    not make the server read (and keep a copy of) any file it can reach."""
    from pathlib import Path

    out = dict(extra)
    for key in PROMPT_FILE_KEYS:
        value = out.get(key)
        if not (isinstance(value, dict) and "file" in value):
            continue
        name = value["file"]
        fix = f"put the .txt file in ComfyUI's input folder and give its name relative to it, e.g. {{\"file\": \"prompts.txt\"}}"
        if input_dir is None:
            raise ValueError(f"spec_overrides {key}.file: no ComfyUI input folder is known here; give {key} as a list")
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"spec_overrides {key}.file {name!r} is refused: absolute paths and '..' are not "
                             f"allowed; {fix}")
        root = Path(input_dir).resolve()
        path = (root / name).resolve()
        if root not in path.parents:
            raise ValueError(f"spec_overrides {key}.file {name!r} resolves outside ComfyUI's input folder {root}; {fix}")
        out[key] = {**value, "file": str(path)}
    return out


def check_gpus(gpus: int, device: str, prompts_per_iteration: int) -> None:
    """gpus > 1 (torchrun, one rank per GPU): the iteration's prompts split evenly over the ranks, and on
    CUDA each rank needs a GPU of its own that this machine has. CPU ranks (gloo) need no GPU."""
    if gpus < 1:
        raise ValueError(f"gpus = {gpus}; set it to 1 (one process) or more")
    if gpus == 1:
        return
    if prompts_per_iteration % gpus:
        up = -(-prompts_per_iteration // gpus) * gpus
        raise ValueError(f"gpus = {gpus} needs prompts_per_iteration divisible by {gpus} (every rank rolls out the "
                         f"same number of whole prompts), got {prompts_per_iteration}; set prompts_per_iteration to "
                         f"{up} (or another multiple of {gpus}) or change gpus")
    if device.startswith("cuda:"):
        raise ValueError(f"gpus = {gpus} with device {device!r}: each rank takes its own GPU; set device to 'cuda' "
                         "or 'auto'")
    from egrpo_backend.policies import resolve_device

    if resolve_device(device).type != "cuda":
        return  # gloo ranks on the CPU
    import torch

    count = torch.cuda.device_count()
    if count < gpus:
        raise ValueError(f"gpus = {gpus} needs {gpus} CUDA devices (one per rank) but this machine has {count}; "
                         f"set gpus to {max(1, count)} or less, or device to 'cpu' (gloo ranks)")
