"""Job spec: one dataclass per concern, every field commented, defaults in one place.

A spec is JSON (a file or a dict). Unknown keys and out-of-range values raise a SpecError that
names the key and the allowed values. `JobSpec.to_dict()` is saved into job.json, every
checkpoint and every LoRA's metadata, so a result always says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec_limits import (  # noqa: F401  (re-exported: the spec's error and limits are named here too)
    MAX_DEVICE_INDEX, MAX_ITERATIONS, MAX_LIST_ITEMS, MAX_PATH_CHARS, MAX_PROMPT_CHARS, MAX_PROMPTS,
    MAX_PROMPTS_PER_ITERATION, MAX_REWARD_WEIGHT, MAX_SEED, MAX_TEXT_CHARS, MAX_THREADS, SpecError)


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise SpecError(f"{key} = {_short(value)} is not allowed; valid values: {', '.join(map(repr, allowed))}")


def _range(key: str, value, lo=None, hi=None, lo_open=False, why: str = "") -> None:
    # Integers are compared as integers: math.isfinite(10**400) overflows converting it to a float.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise SpecError(f"{key} must be a finite number, got {_short(value)}")
    if isinstance(value, int) and value.bit_length() > 128:  # far outside every range below; repr would be 400 digits
        raise SpecError(f"{key} = a {len(str(abs(value)))}-digit integer is out of range"
                        + (f"; it must be between {lo} and {hi}" if lo is not None and hi is not None else "") + why)
    low = lo is not None and (value <= lo if lo_open else value < lo)
    if low or (hi is not None and value > hi):
        bounds = [f"{'>' if lo_open else '>='} {lo}"] * (lo is not None) + [f"<= {hi}"] * (hi is not None)
        raise SpecError(f"{key} = {value!r} is out of range; it must be {' and '.join(bounds)}{why}")


def _short(value, limit: int = 80) -> str:
    """repr(value), cut: an error line quotes a value, never a 10,000-character one."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class ComfySpec:
    """Where a ComfyUI-loaded model's files are (model.source = "comfy"); the Train node fills it."""

    comfy_root: str = ""  # ComfyUI's folder, put on sys.path in the job's child process
    kind: str = "diffusion_model"  # what model.path is: diffusion_model (UNETLoader file) | checkpoint (all-in-one file)
    vae: str = ""  # VAE file (or the checkpoint itself); "" = no VAE, images are a latent preview (tests only)
    cond_cache: str = ""  # safetensors of the prompts' conds, encoded once by the node in ComfyUI's process
    guidance: float = -1.0  # < 0: as the graph samples (the conds' own, e.g. FluxGuidance, else the model's default); >= 0: set on every prompt, as FluxGuidance does
    width: int = 512  # rollout image width in pixels
    height: int = 512  # rollout image height in pixels
    length: int = 1  # video models: pixel frames, as ComfyUI's empty video latent nodes take it; 1 for image models
    loras: list = field(default_factory=list)  # LoRAs patched onto the MODEL before the Train node: [{"name": file in loras, "strength"}], trained on top
    lora_dirs: list = field(default_factory=list)  # ComfyUI's loras folders, where those names are looked up (never outside them)
    model_sampling: dict = field(default_factory=dict)  # a ModelSampling* patch on the MODEL: {"kind": discrete_flow | flux, "shift", "multiplier"}; {} = the model's own
    clip: dict = field(default_factory=dict)  # the graph's CLIP files, reloaded in the job to encode prompts as needed (policies/comfy_clip.py); {} = the node encoded every prompt

    def validate(self) -> None:
        _choice("model.comfy.kind", self.kind, COMFY_KINDS)
        _range("model.comfy.guidance", self.guidance, -1, 1000)
        _range("model.comfy.length", self.length, 1, 10_000)
        if not isinstance(self.length, int):
            raise SpecError(f"model.comfy.length = {self.length!r} must be a whole number of frames (1 for image models)")
        for i, entry in enumerate(self.loras):
            if not isinstance(entry, dict) or set(entry) != {"name", "strength"} or not isinstance(entry["name"], str):
                raise SpecError(f"model.comfy.loras[{i}] = {entry!r} must be {{\"name\": file in loras, \"strength\": number}}")
            _range(f"model.comfy.loras[{i}].strength", entry["strength"], -100, 100)
        if self.model_sampling:
            ms = self.model_sampling
            if set(ms) - {"kind", "shift", "multiplier"} or ms.get("kind") not in ("discrete_flow", "flux"):
                raise SpecError(f"model.comfy.model_sampling = {ms!r}: expected {{\"kind\": \"discrete_flow\" | "
                                "\"flux\", \"shift\": number, \"multiplier\": number}")
            _range("model.comfy.model_sampling.shift", ms.get("shift"), -100, 100)
            _range("model.comfy.model_sampling.multiplier", ms.get("multiplier", 1000.0), 0, lo_open=True)
        if self.clip:
            from .policies.comfy_clip import check_clip_record

            check_clip_record(self.clip)
        for key in ("width", "height"):
            value = getattr(self, key)
            _range(f"model.comfy.{key}", value, 64, 4096)
            if value % 16:
                raise SpecError(f"model.comfy.{key} = {value} must be a multiple of 16 (latent patches are 2x2 of 8-px cells)")


COMFY_KINDS = ("diffusion_model", "checkpoint")


@dataclass
class ModelSpec:
    source: str = "default"  # "default" (embedded digits model), "diffusers" (local folder), "comfy" (ComfyUI files)
    path: str = ""  # diffusers: pipeline folder (model_index.json) or transformer folder; comfy: diffusion model file
    family: str = "auto"  # diffusers transformer family: auto, sd3, flux, sana
    dtype: str = "auto"  # compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16
    weight_dtype: str = "auto"  # storage dtype of the frozen base: auto (= dtype; comfy: the file's own), float8_e4m3fn, float8_e5m2, bfloat16, float16, float32
    gradient_checkpointing: str = "auto"  # auto (on for CUDA, for comfy models, and with offload_blocks), on, off
    offload_blocks: Any = 0  # block swap (docs/memory.md): the last N transformer blocks stream from host memory; "auto": from free memory
    comfy: ComfySpec = field(default_factory=ComfySpec)  # comfy source only: the files ComfyUI loaded
    width: int = 0  # diffusers source: image width in pixels; 0 = the transformer config's sample_size (FLUX.1 has none: set it)
    height: int = 0  # diffusers source: image height in pixels; 0 = as width (both 0: sample_size)

    def validate(self) -> None:
        from .dtypes import COMPUTE_DTYPES, STORAGE_DTYPES
        from .policies import FAMILY_NAMES, SOURCES

        _choice("model.source", self.source, SOURCES)
        _choice("model.family", self.family, ("auto", *FAMILY_NAMES))
        _choice("model.dtype", self.dtype, ("auto", *COMPUTE_DTYPES))
        _choice("model.weight_dtype", self.weight_dtype, ("auto", *STORAGE_DTYPES))
        _choice("model.gradient_checkpointing", self.gradient_checkpointing, ("auto", "on", "off"))
        if self.offload_blocks != "auto" and (isinstance(self.offload_blocks, bool) or not isinstance(self.offload_blocks, int)
                                              or self.offload_blocks < 0):
            raise SpecError(f"model.offload_blocks = {_short(self.offload_blocks)} is not allowed; give a block count (an "
                            "integer >= 0, 0 = no block swap) or 'auto' (from the device's free memory)")
        if self.offload_blocks != "auto":
            _range("model.offload_blocks", self.offload_blocks, 0, 10_000)  # far above any model's block count
        if self.offload_blocks != 0 and self.source == "default":
            raise SpecError("model.offload_blocks: the default model is tiny and has nothing to swap; set it to 0")
        if self.offload_blocks != 0 and self.gradient_checkpointing == "off":
            raise SpecError("model.offload_blocks needs gradient checkpointing (without it autograd keeps every swapped "
                            "block's device copy until backward, so the update holds the whole model); set "
                            "model.gradient_checkpointing to 'auto' or 'on', or model.offload_blocks to 0")
        for side in ("width", "height"):
            value = getattr(self, side)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 16384:
                raise SpecError(f"model.{side} must be a whole number of pixels in 0..16384 (0 = from the model's config), got {value!r}")
        if self.source != "diffusers" and (self.width or self.height):
            raise SpecError("model.width / model.height are for model.source 'diffusers'; the comfy source sets its size in "
                            "model.comfy.width / height, the default model has a fixed size")
        if self.source != "default" and not self.path:
            raise SpecError(f"model.path is required for model.source = {self.source!r} (a local folder or file)")
        if self.source == "default" and self.path:  # never ignored silently: the embedded model has no file
            raise SpecError(f"model.path = {_short(self.path)} is not used by model.source = 'default' (the embedded "
                            "digits model); remove model.path or set model.source to 'diffusers' or 'comfy'")
        if self.source == "comfy":
            self.comfy.validate()
        elif self.comfy != ComfySpec():
            raise SpecError(f"model.comfy applies to model.source = 'comfy' only (this spec has {self.source!r}); "
                            "remove model.comfy")

    def gradient_checkpointing_on(self, device) -> bool:
        """auto: on for CUDA (memory), and always for comfy models, whose blocks add residuals in
        place and so need recomputation to backpropagate at all (docs/memory.md)."""
        if self.gradient_checkpointing != "auto":
            return self.gradient_checkpointing == "on"
        return device.type == "cuda" or self.source == "comfy" or self.offload_blocks != 0


@dataclass(init=False)
class AlgorithmSpec:
    """E-GRPO and the baselines are settings of one engine (algorithms.py has the presets).

    The defaults below are the paper's E-GRPO. Constructing `AlgorithmSpec(preset="dance", eta=0.5)`
    starts from these, applies the preset's values, then the given ones, whoever constructs it
    (a spec file, a node, a test), so a preset can never silently run as E-GRPO.
    """

    preset: str = "egrpo"  # named preset the other fields override (see algorithms.PRESETS)
    steps: int = 16  # T, sampling steps of the shifted grid
    shift: float = 3.0  # s in t = s t / (1 + (s - 1) t)
    sigmas: list = field(default_factory=list)  # explicit grid (T + 1 values ending at 0); overrides steps/shift
    eta: float = 0.7  # a: SDE noise level
    diffusion: str = "flow_grpo"  # g(sigma): flow_grpo = a sqrt(sigma / (1 - sigma)); constant = a (DanceGRPO)
    tau: float = 2.2  # entropy threshold for merging; 0 = no merging (Granular-GRPO)
    merge: Any = "adaptive"  # consolidated SDE step width: "adaptive" (by entropy and tau) or a fixed int >= 1 (ignores tau)
    active: Any = "0-7"  # trained steps: "0-7", "0,2,4", "all", "first_half", or a list
    group_size: int = 8  # G, members per group (same prompt, same branch step)
    granularities: list = field(default_factory=lambda: [1])  # ODE finish grids: keep every g-th remaining sigma
    granularity_grid: str = "authors"  # authors: one fine step, then every g-th (VisualGRPO) | strided: every g-th from the SDE end
    branch: str = "active"  # where groups branch each iteration: active | sample_active | random | sliding | first
    branches_per_prompt: int = 1  # groups per prompt for sample_active / random
    branch_weighting: str = "uniform"  # sample_active: uniform or entropy (by merged entropy score)
    slide_every: int = 1  # sliding (MixGRPO): iterations before the window moves one step
    sde_window: int = 1  # consecutive (merged) SDE steps per member from the branch step; 0 = to the end
    train_fraction: float = 1.0  # fraction of each unit's SDE window positions trained (DanceGRPO 0.6)
    train_last_step: bool = True  # train transitions that end at sigma = 0; False: DanceGRPO, Flow-GRPO
    train_subset: str = "per_group"  # train_fraction < 1: one subset per group, or per member (per_sample, DanceGRPO)
    kl_form: str = "gaussian"  # KL per transition: gaussian (/ g^2 |dt|) | flow_grpo (/ g^2, Flow-GRPO)
    window_within_active: bool = False  # cut each member's SDE window at the last active step (MixGRPO)
    slide_rollback: bool = True  # sliding: after the last active step start again at the first; False: stay
    shared_initial_noise: bool = True  # one initial noise per prompt for all groups and members (E-GRPO)
    advantage: str = "group"  # group (mean/std within group) | prompt_mean_batch_std (Flow-GRPO)
    advantage_clip: float = 5.0  # clip |A|
    reward_mode: str = "weighted_sum"  # weighted_sum | per_reward (normalise each reward, then weighted sum)
    clip_range: float = 1e-4  # PPO epsilon (paper 1e-4; a small LoRA learns faster with ~0.2: bench/results)
    kl_beta: float = 0.0  # weight of KL(policy || base) per transition; 0 = off (paper)
    update_mode: str = "averaged"  # averaged (paper: loss averaged over active steps) | per_step (optimizer step per active step)
    guidance_scale: float = 1.0  # classifier-free guidance in rollouts and updates; 1 = off
    negative_prompt: str = ""  # unconditional prompt for CFG
    loss: str = "grpo"  # grpo: SDE groups + clipped ratio | nft: DiffusionNFT, ODE rollouts + negative-aware loss (nft_update.py)
    nft_beta: float = 1.0  # nft: beta (> 0) of v+ = (1 - beta) v_old + beta v, v- = (1 + beta) v_old - beta v
    nft_decay: int = 1  # nft: old-policy EMA schedule 0 | 1 | 2 (nft.old_policy_decay; reference default 1)
    nft_timestep_fraction: float = 0.99  # nft: each clean sample trains at int(T x this) distinct sigmas of the grid

    def __init__(self, preset: str = "egrpo", **values):
        from .method.algorithms import PRESETS

        if not isinstance(preset, str) or preset not in PRESETS:
            raise SpecError(f"algorithm.preset = {_short(preset)} is not allowed; valid values: {', '.join(map(repr, PRESETS))}")
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(self) if f.name != "preset"}
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise SpecError(f"unknown key 'algorithm.{unknown[0]}'; allowed keys: preset, {', '.join(defaults)}")
        self.preset = preset
        for key, value in {**defaults, **PRESETS[preset], **values}.items():
            setattr(self, key, list(value) if isinstance(value, list) else value)

    def validate(self) -> None:
        from .method.advantage import ADVANTAGE_MODES, REWARD_MODES
        from .method.algorithms import BRANCH_KINDS, BRANCH_WEIGHTINGS, KL_FORMS, TRAIN_SUBSETS, UPDATE_MODES
        from .method.rollout import GRANULARITY_GRIDS
        from .method.schedule import DIFFUSION_KINDS, check_merge
        _range("algorithm.steps", self.steps, 2, 1000)
        _range("algorithm.shift", self.shift, 0, 1000, lo_open=True)
        _range("algorithm.eta", self.eta, 0, 100, lo_open=True)
        _choice("algorithm.diffusion", self.diffusion, DIFFUSION_KINDS)
        _range("algorithm.tau", self.tau, 0)
        try:
            check_merge(self.merge)
        except ValueError as e:
            raise SpecError(f"algorithm.{e}") from None
        _range("algorithm.group_size", self.group_size, 2, 1024)
        if not self.granularities or any(isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= 1000
                                         for g in self.granularities):
            raise SpecError(f"algorithm.granularities must be a non-empty list of integers >= 1, got {_short(self.granularities)}")
        if not (isinstance(self.active, str) or (isinstance(self.active, list) and self.active
                                                 and all(isinstance(i, int) and not isinstance(i, bool) for i in self.active))):
            raise SpecError(f"algorithm.active must be a string like '0-7', '0,2,4', 'all', 'first_half' or a list of "
                            f"step indices, got {_short(self.active)}")
        if isinstance(self.active, str) and self.active not in ("all", "first_half") and not all(
                _ACTIVE_PART.match(part) for part in self.active.replace(" ", "").split(",")):
            raise SpecError(f"algorithm.active = {_short(self.active)} is not allowed; write step indices 0..999 in "
                            "ASCII digits like '0-7' or '0,2,4', or 'all' or 'first_half'")
        if isinstance(self.active, list):
            for i, step in enumerate(self.active):
                _range(f"algorithm.active[{i}]", step, 0, 999)
        if self.sigmas and any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in self.sigmas):
            raise SpecError(f"algorithm.sigmas must be a list of numbers, got {_short(self.sigmas)}")
        if len(self.sigmas) > 1001:
            raise SpecError(f"algorithm.sigmas has {len(self.sigmas)} values; at most 1001 (1000 steps) are allowed")
        for i, v in enumerate(self.sigmas):
            _range(f"algorithm.sigmas[{i}]", v, 0, 1)
        if isinstance(self.merge, int) and not isinstance(self.merge, bool):
            _range("algorithm.merge", self.merge, 1, 1000)
        if not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise SpecError(f"algorithm.negative_prompt must be a string of at most {MAX_PROMPT_CHARS} characters, got "
                            f"{_short(self.negative_prompt)}")
        _choice("algorithm.branch", self.branch, BRANCH_KINDS)
        _choice("algorithm.granularity_grid", self.granularity_grid, GRANULARITY_GRIDS)
        _range("algorithm.branches_per_prompt", self.branches_per_prompt, 1, 1000)
        _choice("algorithm.branch_weighting", self.branch_weighting, BRANCH_WEIGHTINGS)
        _range("algorithm.slide_every", self.slide_every, 1, MAX_ITERATIONS)
        _range("algorithm.sde_window", self.sde_window, 0, 1000)
        _range("algorithm.train_fraction", self.train_fraction, 0, 1, lo_open=True)
        _choice("algorithm.train_subset", self.train_subset, TRAIN_SUBSETS)
        _choice("algorithm.kl_form", self.kl_form, KL_FORMS)
        for key in ("train_last_step", "slide_rollback", "window_within_active"):
            if not isinstance(getattr(self, key), bool):
                raise SpecError(f"algorithm.{key} must be true or false, got {_short(getattr(self, key))}")
        _choice("algorithm.advantage", self.advantage, ADVANTAGE_MODES)
        _range("algorithm.advantage_clip", self.advantage_clip, 0, lo_open=True)
        _choice("algorithm.reward_mode", self.reward_mode, REWARD_MODES)
        _range("algorithm.clip_range", self.clip_range, 0, lo_open=True)
        _range("algorithm.kl_beta", self.kl_beta, 0, 1e6)
        _choice("algorithm.update_mode", self.update_mode, UPDATE_MODES)
        _range("algorithm.guidance_scale", self.guidance_scale, 0, 100)
        self._validate_nft()
        try:
            plan = self.plan()
        except ValueError as e:
            raise SpecError(f"algorithm: {e}") from None
        if self.branches_per_prompt > len(plan.active):  # branch_starts would silently take min(...) of the two
            raise SpecError(f"algorithm.branches_per_prompt = {self.branches_per_prompt} is out of range; it must be "
                            f">= 1 and <= {len(plan.active)} (the number of active steps, algorithm.active)")

    def _validate_nft(self) -> None:
        from .method.algorithms import LOSSES
        from .method.nft import DECAY_TYPES

        _choice("algorithm.loss", self.loss, LOSSES)
        _range("algorithm.nft_beta", self.nft_beta, 0, lo_open=True)
        if isinstance(self.nft_decay, bool) or self.nft_decay not in DECAY_TYPES:
            raise SpecError(f"algorithm.nft_decay = {_short(self.nft_decay)} is not allowed; valid values: "
                            f"{', '.join(map(str, DECAY_TYPES))} (the old-policy EMA schedule, nft.old_policy_decay)")
        _range("algorithm.nft_timestep_fraction", self.nft_timestep_fraction, 0, 1, lo_open=True)
        if self.loss != "nft":
            return
        T = len(self.grid()) - 1
        if int(T * self.nft_timestep_fraction) < 1:
            raise SpecError(f"algorithm.nft_timestep_fraction = {self.nft_timestep_fraction!r} trains no sigma of the "
                            f"{T}-step grid (int(T x fraction) = 0); set it to at least {1 / T:.4g}")
        if self.guidance_scale != 1.0:
            raise SpecError(f"algorithm.guidance_scale = {self.guidance_scale!r} is not allowed with loss 'nft': "
                            "DiffusionNFT samples and trains without CFG; set algorithm.guidance_scale = 1.0")
        if self.reward_mode != "weighted_sum":
            raise SpecError(f"algorithm.reward_mode = {self.reward_mode!r} is not allowed with loss 'nft': its "
                            "optimality probability comes from the weighted sum of the rewards; set "
                            "algorithm.reward_mode = 'weighted_sum'")

    def grid(self) -> list[float]:
        from .method.schedule import shifted_sigmas

        return [float(s) for s in self.sigmas] if self.sigmas else shifted_sigmas(self.steps, self.shift)

    def plan(self):
        from .method.schedule import build_plan

        return build_plan(self.grid(), self.eta, self.tau, self.active, self.diffusion, merge=self.merge)


@dataclass
class LoraSpec:
    rank: int = 8  # LoRA rank r
    alpha: float = 8.0  # scale = alpha / rank
    target_modules: list = field(default_factory=list)  # module name suffixes; empty = attention projections of the model
    init_seed: int = 0  # seed of the LoRA A matrices (B starts at 0, so training starts at the base model)
    dtype: str = "float32"  # LoRA weights and their AdamW state: float32 (default) | bfloat16 (halves their memory)

    def validate(self) -> None:
        from .dtypes import LORA_DTYPES

        _range("lora.rank", self.rank, 1, 1024)
        _range("lora.init_seed", self.init_seed, 0, MAX_SEED)
        if not all(isinstance(m, str) and _MODULE_NAME.match(m) for m in self.target_modules):
            raise SpecError(f"lora.target_modules must be a list of module names (letters, digits, '_' and '.'), got "
                            f"{_short(self.target_modules)}")
        _range("lora.alpha", self.alpha, 0, 1e6, lo_open=True)
        _choice("lora.dtype", self.dtype, tuple(LORA_DTYPES))


_DEVICE_INDEX = re.compile(r"cuda:([0-9]{1,4})\Z")
_ACTIVE_PART = re.compile(r"([0-9]{1,3}(-[0-9]{1,3})?)?\Z")  # one part of '0-7,9' (ASCII: '٣'.isdigit() is True)
_MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,255}\Z")


@dataclass
class TrainSpec:
    iterations: int = 100  # outer iterations (rollout -> reward -> advantage -> update)
    prompts_per_iteration: int = 2  # prompts rolled out per iteration (each gives one group per branch step)
    lr: float = 3e-4  # AdamW learning rate (LoRA typical 1e-4..3e-4; full fine-tune 2e-6)
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_clip: float = 1.0  # max global grad norm
    lr_schedule: str = "constant"  # constant | cosine | linear (decay to 0 at the last iteration)
    warmup_iterations: int = 0  # linear warm-up from 0
    minibatches: int = 1  # optimizer steps per iteration per inner epoch (averaged mode)
    inner_epochs: int = 1  # passes over each rollout batch
    micro_batch: int = 16  # (group, step) units per forward with grad; bounds memory, not the math
    rollout_batch: int = 64  # samples per no-grad forward in rollouts and evaluation; bounds memory
    decode_batch: int = 8  # images per VAE decode and per reward call; bounds memory of the scoring phase
    checkpoint_every: int = 5  # iterations between checkpoints (and at the end / on cancel)
    evaluate: bool = True  # held-out evaluation (eval_prompts x eval_seeds, or the model's own set) at start and end
    eval_every: int = 0  # iterations between extra held-out evaluations; 0 = only at start and end
    sample_every: int = 0  # iterations between sample grids written to samples/; 0 = off
    seed: int = 0  # rollout noise, prompt order, branch choices
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch default
    diversity_guard: float = 0.0  # reward-hacking guard: if held-out diversity < this x base, stop and restore the last LoRA that passed; 0 = off
    drift_guard: float = 0.0  # reward-hacking guard: if held-out drift from real data (models that measure it) > this x base, stop and restore; 0 = off, else >= 1
    parallel: str = "ddp"  # multi-rank gradient averaging: ddp (LoRA replicated) | fsdp (FSDP2, frozen base sharded); see docs/scale_out.md
    dist_timeout: float = 300.0  # seconds a collective may wait before the process group fails (no hang when a rank dies)
    cond_cache_gb: float = 20.0  # encoded prompts kept on disk in the job folder (conds/), least recently used dropped first; 0 = none
    cond_memory_gb: float = 2.0  # encoded prompts kept in memory (LRU); prompts are encoded ahead in chunks (docs/prompts.md)

    def validate(self) -> None:
        _range("train.iterations", self.iterations, 1, MAX_ITERATIONS)
        _range("train.prompts_per_iteration", self.prompts_per_iteration, 1, MAX_PROMPTS_PER_ITERATION)
        _range("train.lr", self.lr, 0, 1, lo_open=True)
        _range("train.weight_decay", self.weight_decay, 0, 1000)
        _range("train.grad_clip", self.grad_clip, 0, lo_open=True)
        _choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        _range("train.warmup_iterations", self.warmup_iterations, 0, MAX_ITERATIONS)
        _range("train.minibatches", self.minibatches, 1, 65536)
        _range("train.inner_epochs", self.inner_epochs, 1, 100)
        _range("train.micro_batch", self.micro_batch, 1, 65536)
        _range("train.rollout_batch", self.rollout_batch, 1, 65536)
        _range("train.decode_batch", self.decode_batch, 1, 65536)
        _range("train.checkpoint_every", self.checkpoint_every, 1, MAX_ITERATIONS)
        _range("train.eval_every", self.eval_every, 0, MAX_ITERATIONS)
        _range("train.sample_every", self.sample_every, 0, MAX_ITERATIONS)
        _range("train.seed", self.seed, 0, MAX_SEED)
        _range("train.threads", self.threads, 0, MAX_THREADS)
        _range("train.diversity_guard", self.diversity_guard, 0, 1)
        if self.drift_guard:
            _range("train.drift_guard", self.drift_guard, 1, 100)
        _choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        _range("train.dist_timeout", self.dist_timeout, 0, 86400, lo_open=True)
        _range("train.cond_cache_gb", self.cond_cache_gb, 0, 1e6)
        _range("train.cond_memory_gb", self.cond_memory_gb, 0, 1e4, lo_open=True)
        # ASCII digits only: str.isdigit() accepts '٣' and '³', which torch.device cannot parse.
        index = _DEVICE_INDEX.match(self.device)
        if not (self.device in ("auto", "cpu", "cuda") or (index and int(index.group(1)) <= MAX_DEVICE_INDEX)):
            raise SpecError(f"train.device = {_short(self.device)} is not allowed; valid values: 'auto', 'cpu', 'cuda', "
                            f"'cuda:N' (N = 0..{MAX_DEVICE_INDEX}, ASCII digits)")

    def max_update_units(self, algo: "AlgorithmSpec") -> int:
        """The most update inputs (GRPO: (group, step) units; NFT: samples) one iteration can have: more
        minibatches than this would be cut to it silently (Trainer._minibatches, NFTUpdate._chunks)."""
        if algo.loss == "nft":
            return self.prompts_per_iteration * algo.group_size
        plan = algo.plan()
        branches = {"active": len(plan.active), "first": 1, "sliding": 1}.get(
            algo.branch, min(algo.branches_per_prompt, len(plan.active)))
        window = algo.sde_window or len(plan.steps)
        return self.prompts_per_iteration * branches * algo.group_size * min(window, len(plan.steps))


@dataclass
class OutputSpec:
    name: str = "egrpo_lora"  # LoRA file name stem (letters, digits, - _ . only; no folders)
    formats: list = field(default_factory=lambda: ["peft"])  # exported formats: kohya, peft, comfy (the first is the main file)
    copy_to: str = ""  # optional folder the final LoRA is also copied to (e.g. ComfyUI's loras/egrpo)

    def validate(self) -> None:
        from .paths import check_name

        try:
            check_name(self.name, "output.name")
        except ValueError as e:
            raise SpecError(str(e)) from None
        if not self.formats:
            raise SpecError("output.formats is empty; give one or more of 'kohya', 'peft', 'comfy'")
        from .lora import FORMATS

        for f in self.formats:
            _choice("output.formats[]", f, FORMATS)


@dataclass
class JobSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    prompts: Any = field(default_factory=list)  # list of training prompts, or {"file": "prompts.txt"} (a .txt / .jsonl / .csv file or folder, docs/prompts.md)
    eval_prompts: Any = field(default_factory=list)  # held-out prompts (same forms, e.g. {"file": "hpdv2", "split": "test"}); [] = none (or the model's own set)
    eval_seeds: list = field(default_factory=list)  # seeds for held-out sampling; [] = 10000..10009
    rewards: list = field(default_factory=lambda: [{"name": "jpeg_compressibility", "weight": 1.0}])  # [{"name", "weight", ...options}]
    algorithm: AlgorithmSpec = field(default_factory=AlgorithmSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    # Not a spec key (a spec cannot set it): the folder a relative prompts.file is read from, the spec
    # file's folder (from_file) or the job folder (load_spec). A class attribute, not a dataclass field,
    # so it is never saved into job.json or a LoRA header, and _build refuses it as an unknown key.
    base_dir = ""

    def validate(self) -> "JobSpec":
        for part in (self.model, self.algorithm, self.lora, self.train, self.output):
            part.validate()
        if self.algorithm.loss == "nft" or self.algorithm.update_mode == "averaged":
            most = self.train.max_update_units(self.algorithm)
            _range("train.minibatches", self.train.minibatches, 1, most,
                   why=f" (one iteration of this spec has at most {most} update inputs to split into minibatches)")
        if self.model.offload_blocks != 0 and self.train.parallel == "fsdp":
            raise SpecError("model.offload_blocks with train.parallel 'fsdp': FSDP2 already shards the frozen base across "
                            "ranks and cannot shard blocks kept on the host; use train.parallel 'ddp' or model.offload_blocks 0")
        self.prompt_set()  # resolves, indexes and checks the prompt file (streamed)
        if self.eval_prompts:
            self.prompt_set(eval=True)
        if not isinstance(self.rewards, list) or not self.rewards:
            raise SpecError("rewards must be a non-empty list like [{'name': 'jpeg_compressibility', 'weight': 1.0}]")
        from .rewards import frames as reward_frames
        from .rewards.catalogue import reward_min_frames, reward_names, reward_options

        for i, r in enumerate(self.rewards):
            if not isinstance(r, dict) or "name" not in r:
                raise SpecError(f"rewards[{i}] must be an object with a 'name', got {_short(r)}")
            if not isinstance(r["name"], str):
                raise SpecError(f"rewards[{i}].name must be a string, got {_short(r['name'])}")
            _choice(f"rewards[{i}].name", r["name"], tuple(reward_names()))
            _range(f"rewards[{i}].weight", r.get("weight", 1.0), -MAX_REWARD_WEIGHT, MAX_REWARD_WEIGHT)
            allowed = reward_options(r["name"])
            unknown = sorted(set(r) - {"name", "weight", *allowed})
            if unknown:
                raise SpecError(f"unknown option 'rewards[{i}].{unknown[0]}' for reward {r['name']!r}; "
                                f"its options: {', '.join(allowed) or 'none'}")
            _check_reward_option_types(i, r)
            try:  # video: the frames a reward scores against the frames the model makes (docs/rewards.md)
                reward_frames.check_reward_frames(f"rewards[{i}]", r["name"], r.get("frames", "all"),
                                                  reward_min_frames(r["name"]), reward_frames.model_frames(self.model))
            except ValueError as e:
                raise SpecError(str(e)) from None
        if all(r.get("weight", 1.0) == 0 for r in self.rewards):  # the advantages would all be 0: no gradient at all
            raise SpecError(f"rewards[].weight: every reward weight is 0, so every advantage is 0 and the LoRA never "
                            f"changes; give at least one reward a weight other than 0 (-{MAX_REWARD_WEIGHT:g} .. "
                            f"{MAX_REWARD_WEIGHT:g})")
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in self.eval_seeds):
            raise SpecError(f"eval_seeds must be a list of integers in 0..2**63-1, got {_short(self.eval_seeds)}")
        from .export_formats import unloadable_formats

        for fmt, why in unloadable_formats(self):  # before any job folder exists (docs/lora_formats.md)
            raise SpecError(f"output.formats: {fmt!r} cannot be exported for this model: {why}; "
                            f"use {'peft' if fmt != 'peft' else 'kohya or comfy'} instead")
        from .provenance import check_header_size

        check_header_size(self)  # what every checkpoint's LoRA header carries: refused now, not at iteration 1
        return self

    def prompt_set(self, eval: bool = False):
        """The training (or held-out) prompts as a sequence: an inline list, or a file / folder read as a
        stream through its index (prompt_sets.py); len() and [i] without holding the set."""
        from .prompt_sets import open_prompts

        key = "eval_prompts" if eval else "prompts"
        value = open_prompts(self.eval_prompts if eval else self.prompts, key, self.base_dir)
        if not eval and not len(value) and self.model.source != "default":
            raise SpecError(f"{key} is empty; give at least one prompt (the embedded default has its own prompt set)")
        return value

    def prompt_list(self, eval: bool = False) -> list[str]:
        """Every prompt in memory: for held-out sets and small lists (training reads prompt_set)."""
        return list(self.prompt_set(eval))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, base_dir: str = "") -> "JobSpec":
        try:
            check_text(data)
            spec = _build(cls, data, "")
        except RecursionError:
            raise SpecError("spec is nested too deeply (lists or objects inside each other hundreds of levels "
                            "deep); a job spec is at most a few levels deep") from None
        spec.base_dir = str(base_dir) if base_dir else ""
        return spec.validate()

    @classmethod
    def from_file(cls, path) -> "JobSpec":
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"spec file not found: {path}")
        try:
            data = loads_strict(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SpecError(f"spec file {path} is not valid JSON: {e}") from None
        except RecursionError:
            raise SpecError(f"spec file {path} is nested too deeply; a job spec is at most a few levels deep") from None
        return cls.from_dict(data, base_dir=str(path.resolve().parent))


def loads_strict(text: str):
    """json.loads that refuses a key given twice in one object (plain JSON silently keeps the last)."""

    def pairs(items):
        keys = [k for k, _ in items]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise SpecError(f"the key {dup!r} appears twice in one object; keep one")
        return dict(items)

    return json.loads(text, object_pairs_hook=pairs, parse_int=_parse_int)


def _parse_int(text: str):
    """An integer of JSON; beyond Python's int-conversion limit (4300 digits, a ValueError naming no key)
    it reads as +-inf, which every numeric key then refuses by name."""
    if len(text) <= 4000:
        return int(text)
    return float("-inf") if text.startswith("-") else float("inf")


_PATH_KEYS = ("model.path", "model.comfy.comfy_root", "model.comfy.vae", "model.comfy.cond_cache", "output.copy_to")


def _text_problem(text: str) -> str | None:
    """Why a string cannot be carried (written to job.json, a LoRA header, a file name), or None."""
    if "\x00" in text:
        return f"contains a NUL byte at position {text.index(chr(0))}; remove it"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"contains a lone surrogate ({text[e.start]!r} at position {e.start}), which is not text and cannot "
                "be written as UTF-8; remove it")
    return None


def check_text(value, key: str = "spec") -> None:
    """Every string (keys too) in a spec as loaded: no NUL byte, no lone surrogate, bounded length; every
    list bounded. Checked before anything else reads the values, so the error names where it is."""
    if isinstance(value, str):
        problem = _text_problem(value)
        if problem:
            raise SpecError(f"{key} {problem}")
        limit = MAX_PATH_CHARS if key in _PATH_KEYS else MAX_TEXT_CHARS
        if len(value) > limit:
            raise SpecError(f"{key} is {len(value)} characters long; at most {limit} are allowed")
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and (_text_problem(k) or len(k) > 256):
                raise SpecError(f"a key in {key} is not a usable name ({_short(k)}); keys are short plain names")
            check_text(v, k if key == "spec" else f"{key}.{k}")
    elif isinstance(value, list):
        if len(value) > MAX_LIST_ITEMS and key not in ("prompts", "eval_prompts"):
            raise SpecError(f"{key} has {len(value)} entries; at most {MAX_LIST_ITEMS} are allowed")
        for i, v in enumerate(value):
            check_text(v, f"{key}[{i}]")


def _check_reward_option_types(i: int, reward: dict) -> None:
    """A reward option given with the type its factory's default has (an int for a float is fine): a
    wrong type would fail only when the job builds its rewards, after the job folder exists."""
    import inspect

    from .rewards.base import check_memory_options
    from .rewards.catalogue import reward_factory

    try:
        check_memory_options(reward["name"], {k: v for k, v in reward.items() if k not in ("name", "weight")})
    except ValueError as e:
        raise SpecError(f"rewards[{i}]: {e}") from None
    params = inspect.signature(reward_factory(reward["name"])).parameters
    for k, v in reward.items():
        if k in ("name", "weight") or k not in params:
            continue
        default = params[k].default
        if default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, (int, float)):
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and (not isinstance(v, float) or math.isfinite(v))
                  and (isinstance(default, float) or isinstance(v, int) or v.is_integer()))
        elif isinstance(default, str):
            ok = isinstance(v, str)
        else:
            continue
        if not ok:
            raise SpecError(f"rewards[{i}].{k} must be {type(default).__name__} like its default {default!r}, "
                            f"got {_short(v)}")


def _build(cls, data, prefix: str):
    """Dataclass from a dict: nested dataclasses recursively, unknown keys rejected by name."""
    if not isinstance(data, dict):
        raise SpecError(f"{prefix or 'spec'} must be an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {prefix[:-1]}" if prefix else ""
        allowed = ", ".join(f for f in fields if f != "base_dir")
        raise SpecError(f"unknown key '{prefix}{unknown[0]}'{where}; allowed keys: {allowed}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(f"{prefix}{k}", t, v)
    return cls(**kwargs)


def _coerce(key: str, t, v):
    if t is bool and not isinstance(v, bool):
        raise SpecError(f"{key} must be true or false, got {_short(v)}")
    if t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise SpecError(f"{key} must be an integer, got {_short(v)}")
    if t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(f"{key} must be a number, got {_short(v)}")
        try:
            return float(v)
        except OverflowError:  # an integer of hundreds of digits
            raise SpecError(f"{key} = a {len(str(abs(v)))}-digit integer is out of range of a number") from None
    if t is str and not isinstance(v, str):
        raise SpecError(f"{key} must be a string, got {_short(v)}")
    if t is list and not isinstance(v, list):
        raise SpecError(f"{key} must be a list, got {_short(v)}")
    if t is dict and not isinstance(v, dict):
        raise SpecError(f"{key} must be an object, got {_short(v)}")
    return v
