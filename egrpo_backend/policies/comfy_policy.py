"""The comfy FlowPolicy: a model loaded by ComfyUI's own loaders (comfy.sd), trained with our LoRA.

Runs only inside a job's child process; ComfyUI is imported here and nowhere else in the engine.
model_spec.path is the diffusion-model (or checkpoint) file; model_spec.comfy (config.ComfySpec)
says where the rest is. Each prompt's WHOLE conditioning as ComfyUI's CLIP makes it (comfy_conds.py)
comes from the node's cache (held-out and negative prompts; every prompt when the CLIP cannot be
reloaded) or is encoded here, as needed, by the graph's CLIP reloaded from its files (comfy_clip.py)
into the job's bounded cond store (cond_store.py, docs/prompts.md).
The contract (docs/comfyui.md): velocity(x, sigma) is what ComfyUI's own sampler computes for the same
graph at cfg 1. So the conditioning goes through comfy.samplers.process_conds (the model's own
extra_conds: guidance defaults, attention masks, padding) and comfy.samplers.sampling_function, the
LoRAs and ModelSampling patch the graph put on the MODEL are applied here the way its nodes apply them,
and the latent has the shape ComfyUI's empty-latent nodes give this family (comfy_latents.py): [C, H, W]
for images, [C, F, H, W] when the latent format has latent_dimensions == 3 (video, and Qwen-Image).
Conventions (policies/base.py): latents are the model's own space (ComfyUI's process_latent_in),
ComfyUI's model returns the denoised x0, so v = (x - x0) / sigma; the LoRA sits on
`BaseModel.diffusion_model`, so exported kohya keys are `lora_unet_<BFL path>`, which ComfyUI's
LoraLoader maps. Backward needs comfy.model_management.in_training = True (fused kernels have no
autograd otherwise) and, for Flux, gradient checkpointing of every block.

Weights (docs/memory.md, "Weight storage"): the base stays in the file's storage dtype (fp8 e4m3fn /
e5m2, bf16, fp16; scaled-fp8 files keep ComfyUI's own quantized ops) and computes in the compute dtype
through ComfyUI's casting ops, as its samplers do: `load_diffusion_model(path, model_options={"dtype":
storage})` builds comfy.ops.manual_cast layers, which upcast their weight per forward, and
`cast_per_layer` makes sure every op whose weight is not in the compute dtype casts. Nothing calls
`.to(dtype=...)` on the base. Our LoRA wraps those ops (they subclass torch.nn.Linear) as peft's
base_layer and stays in the LoRA dtype.
What the tests cover without ComfyUI (tests/test_memory.py): `file_storage_dtype`, `comfy_model_options`
and `cast_per_layer` on a stand-in module with ComfyUI's cast-weights-on-forward pattern (fp8 storage,
LoRA training through it). What only a real ComfyUI covers (tests/comfy_integration, COMFYUI_PATH):
loading, ComfyUI's own choice of ops, scaled-fp8 files, the VAE.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .. import lora as lora_lib
from ..dtypes import STORAGE_DTYPES
from . import block_swap
from .base import lora_disabled

TILE_ABOVE_PX = 1024  # decode images larger than this (either side) with the VAE's decode_tiled


def _import_comfy(root: str, device: torch.device):
    if not root or not (Path(root) / "comfy").is_dir():
        raise FileNotFoundError(f"model.comfy.comfy_root = {root!r} is not a ComfyUI folder (expected {root}/comfy/)")
    if root not in sys.path:
        sys.path.insert(0, root)
    argv = sys.argv
    sys.argv = [argv[0]] + (["--cpu"] if device.type == "cpu" else []) + ["--disable-api-nodes"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management as mm
        import comfy.sd
        import comfy.utils
    finally:
        sys.argv = argv
    mm.in_training = True  # this process only trains: autograd-capable attention everywhere
    return comfy


def _checkpoint_blocks(diffusion_model: torch.nn.Module) -> int:
    """Recompute every block of the model's ModuleLists in backward (Flux adds residuals in place)."""
    from torch.utils.checkpoint import checkpoint

    count = 0
    for child in diffusion_model.children():
        if not isinstance(child, torch.nn.ModuleList):
            continue
        for block in child:
            forward = block.forward

            def run(*args, __f=forward, **kwargs):  # blocks add residuals into their input in place: clone
                args = [a.clone() if torch.is_tensor(a) else a for a in args]
                kwargs = {k: v.clone() if torch.is_tensor(v) and k in ("img", "txt", "x") else v for k, v in kwargs.items()}
                return __f(*args, **kwargs)

            def wrapped(*args, __f=forward, __run=run, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(__run, *args, use_reentrant=False, **kwargs)
                return __f(*args, **kwargs)

            block.forward = wrapped
            count += 1
    return count


def file_storage_dtype(path: str) -> torch.dtype | None:
    """The dtype most of a .safetensors file's weights are stored in, from its header (nothing is loaded).

    None when ComfyUI's loader should decide: other file formats, and quantized files (scaled fp8:
    a `scaled_fp8` tensor or `_quantization_metadata`), whose layers are ComfyUI's quantized ops.
    """
    if not str(path).endswith(".safetensors"):
        return None
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = header.pop("__metadata__", None) or {}
    if "_quantization_metadata" in meta or any(k.endswith("scaled_fp8") for k in header):
        return None
    names = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    counts: dict[str, int] = {}
    for info in header.values():
        numel = 1
        for d in info["shape"]:
            numel *= d
        counts[info["dtype"]] = counts.get(info["dtype"], 0) + numel
    most = max(counts, key=counts.get) if counts else None
    return STORAGE_DTYPES[names[most]] if most in names else None


def comfy_model_options(weight_dtype: str, path: str) -> dict:
    """model_options for comfy.sd's loaders: the storage dtype (spec's model.weight_dtype, or the
    file's own for "auto"); {} lets ComfyUI type the weights itself (quantized or non-safetensors files)."""
    storage = file_storage_dtype(path) if weight_dtype == "auto" else STORAGE_DTYPES[weight_dtype]
    return {"dtype": storage} if storage is not None else {}


def cast_per_layer(diffusion_model: torch.nn.Module, compute: torch.dtype) -> int:
    """Make every ComfyUI op (comfy.ops: anything with `comfy_cast_weights`) whose weight is not stored
    in `compute` upcast it per forward; returns how many ops cast. ComfyUI's manual_cast ops already
    do; its plain ops (weight dtype = ComfyUI's compute choice) are switched on only if our compute
    dtype differs, which is what ComfyUI's ModelPatcher does for layers it keeps off the GPU."""
    count = 0
    for m in diffusion_model.modules():
        weight = getattr(m, "weight", None)
        if not hasattr(m, "comfy_cast_weights") or not isinstance(weight, torch.Tensor):
            continue
        if weight.dtype != compute and not m.comfy_cast_weights:
            m.comfy_cast_weights = True  # an instance attribute: the class (shared by every model) is untouched
        count += bool(m.comfy_cast_weights)
    return count


class PromptConds:
    """prompt -> CONDITIONING: the node's cache first (a cond-store folder, or the single file of older
    jobs and tests), else the job's cond store, encoded by the reloaded CLIP as needed. Without a
    CLIP record every prompt must be in the node's cache, and a missing one is an error naming it."""

    def __init__(self, node_cache: str, clip_record: dict | None, folder=None, disk_bytes: float = 0,
                 memory_bytes: float = 2 * 2**30):
        from .comfy_clip import ClipEncoder
        from .comfy_conds import COMFY_FAMILY, read_comfy_conds
        from .cond_store import CondStore

        self.node_file, self.node_store, self.store, self.encoder = {}, None, None, None
        if os.path.isfile(node_cache):  # one safetensors file (jobs made before the node cache was a folder)
            prompts, conds = read_comfy_conds(node_cache)
            self.node_file = dict(zip(prompts, conds))
        elif os.path.isdir(node_cache):
            self.node_store = CondStore(self._not_encoded, COMFY_FAMILY, folder=node_cache, disk_bytes=float("inf"),
                                        memory_bytes=min(memory_bytes, 2**28))
        elif not clip_record:
            raise FileNotFoundError(f"prompt cond cache not found: {node_cache!r}; the E-GRPO Train LoRA node writes it "
                                    "(node_conds in the job folder)")
        if clip_record:
            self.encoder = ClipEncoder(clip_record)
            self.store = CondStore(self.encoder.encode_one, COMFY_FAMILY, folder=folder, disk_bytes=disk_bytes,
                                   memory_bytes=memory_bytes, session=self.encoder.session)

    @staticmethod
    def _not_encoded(prompt: str):
        raise KeyError(f"prompt {prompt!r} is not in the job's cond cache and the job has no CLIP to encode it (the "
                       "node encoded the prompts it knew when it created the job): re-create the job after changing "
                       "prompts")

    def _from_node(self, prompt: str) -> bool:
        return prompt in self.node_file or (self.node_store is not None and prompt in self.node_store)

    def get(self, prompt: str) -> list:
        from .comfy_conds import cond_to_conditioning

        if prompt in self.node_file:
            return self.node_file[prompt]
        if self.store is None or (self.node_store is not None and prompt in self.node_store):
            if self.node_store is None:
                self._not_encoded(prompt)
            return cond_to_conditioning(self.node_store.get(prompt))
        return cond_to_conditioning(self.store.get(prompt))

    def uncached(self, prompts) -> list[str]:
        rest = [p for p in dict.fromkeys(prompts) if not self._from_node(p)]
        return self.store.missing(rest) if self.store is not None else rest

    def encode_ahead(self, prompts, progress=None) -> int:
        rest = [p for p in dict.fromkeys(prompts) if not self._from_node(p)]
        if self.store is None:
            if rest:
                self._not_encoded(rest[0])
            return 0
        return self.store.ensure(rest, progress)

    def release(self) -> None:
        if self.encoder is not None:
            self.encoder.release()


class ComfyPolicy:
    LIVE = 64  # conditionings kept ready for velocity() (a T5-XXL one is ~4 MB; the rest come back from the cond stores)

    def __init__(self, patcher, vae, conds: PromptConds, latent_shape, device, length: int = 1, guidance: float = -1.0):
        from collections import OrderedDict

        self.patcher, self.model, self.vae = patcher, patcher.model, vae
        self.diffusion_model = self.model.diffusion_model
        self.latent_shape, self.device, self.length = tuple(latent_shape), device, length
        self.conds, self.guidance = conds, guidance
        self._ids: dict[str, int] = {}
        self._prompts: list[str] = []
        self._live: OrderedDict[int, list] = OrderedDict()

    # --- FlowPolicy ----------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> dict:
        ids = []
        for p in prompts:
            if p not in self._ids:
                self._ids[p] = len(self._prompts)
                self._prompts.append(p)
            ids.append(self._ids[p])
            self._conditioning(ids[-1])  # encoded (or read) now, not inside a rollout
        return {"prompt": torch.tensor(ids, dtype=torch.long)}

    def _conditioning(self, i: int) -> list:
        conditioning = self._live.get(i)
        if conditioning is None:
            conditioning = self.conds.get(self._prompts[i])
            if self.guidance >= 0:  # the node's guidance input: what FluxGuidance would set on every prompt
                conditioning = [(c, {**o, "guidance": float(self.guidance)}) for c, o in conditioning]
            self._live[i] = conditioning
            while len(self._live) > self.LIVE:
                self._live.popitem(last=False)
        self._live.move_to_end(i)
        return conditioning

    def uncached(self, prompts) -> list[str]:
        return self.conds.uncached(prompts)

    def encode_ahead(self, prompts, progress=None) -> int:
        """Encode the prompts neither the node's cache nor the job's store holds, in one CLIP session."""
        return self.conds.encode_ahead(prompts, progress)

    def release_text_encoder(self) -> None:
        self.conds.release()

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        idx = cond["prompt"].tolist()
        out = torch.empty_like(x)
        for p in sorted(set(idx)):
            rows = [i for i, q in enumerate(idx) if q == p]
            out[rows] = self._velocity_rows(x[rows], sigma[rows], p)
        return out

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, p: int) -> torch.Tensor:
        """x0 for prompt p exactly as ComfyUI's sampler computes it at cfg 1 (CFGGuider.predict_noise)."""
        import comfy.sampler_helpers
        import comfy.samplers

        conds = comfy.sampler_helpers.convert_cond([list(c) for c in self._conditioning(p)])
        conds = comfy.samplers.process_conds(self.model, x, {"positive": conds}, self.device,
                                             latent_image=torch.zeros_like(x))["positive"]
        return comfy.samplers.sampling_function(self.model, x, sigma, None, conds, 1.0,
                                                model_options=self.patcher.model_options)

    def _velocity_rows(self, x, sigma, p: int):
        s = sigma.to(x.dtype)
        x0 = self.denoised(x, s, p)
        return (x - x0.to(x.dtype)) / s.view(-1, *[1] * (x.ndim - 1))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] (model.comfy.length = 1) or frames [B, F, C, H, W] (length > 1), in [0, 1], of
        exactly these latents (callers chunk by train.decode_batch); tiled above TILE_ABOVE_PX."""
        z = self.model.process_latent_out(latents.float())
        if self.vae is None:  # latent preview: first channels squashed into [0, 1]
            z = z[:, :3] if z.shape[1] >= 3 else z[:, :1]
            frames = torch.sigmoid(z).float()
            if frames.ndim == 5:  # [B, C, F, H, W] -> [B, F, C, H, W]
                frames = frames.permute(0, 2, 1, 3, 4)
                return frames[:, 0] if self.length == 1 else frames
            return frames
        ratio = self.vae.downscale_ratio
        ratio = ratio[-1] if isinstance(ratio, tuple) else ratio
        tiled = isinstance(ratio, int) and max(z.shape[-2:]) * ratio > TILE_ABOVE_PX
        images = self.vae.decode_tiled(z) if tiled else self.vae.decode(z)
        if images.ndim == 5:  # a video VAE: [B, F, H, W, C]
            frames = images[..., :3].permute(0, 1, 4, 2, 3).float().clamp(0, 1)
            return frames[:, 0] if self.length == 1 else frames
        return images[..., :3].permute(0, 3, 1, 2).float().clamp(0, 1)

    def lora_model(self) -> torch.nn.Module:
        return self.diffusion_model

    def trainable_parameters(self):
        return lora_lib.lora_parameters(self.diffusion_model)

    def set_lora_enabled(self, enabled: bool) -> None:
        lora_lib.set_lora_enabled(self.diffusion_model, enabled)

    def lora_disabled(self):
        return lora_disabled(self)


def load_comfy_policy(model_spec, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool,
                      cond_cache=None, cond_cache_gb: float = 20.0, cond_memory_gb: float = 2.0) -> ComfyPolicy:
    opts = model_spec.comfy
    _import_comfy(opts.comfy_root, device)
    import comfy.sd
    import comfy.utils

    from .comfy_graph import apply_graph_patches, refuse_needs_image
    from .comfy_latents import latent_shape

    path = model_spec.path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path} (model.path must be a diffusion model or checkpoint file)")
    conds = PromptConds(opts.cond_cache, opts.clip or None, folder=cond_cache, disk_bytes=cond_cache_gb * 2**30,
                        memory_bytes=cond_memory_gb * 2**30)  # checked before the model loads
    kind = opts.kind
    options = comfy_model_options(model_spec.weight_dtype, path)
    # disable_dynamic: the job owns its weights (moved to the device once, below); ComfyUI's dynamic
    # (streamed-weight) patcher would make apply_model prefetch weights it never loaded.
    if kind == "checkpoint":
        patcher = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False, model_options=options,
                                                        disable_dynamic=True)[0]
    else:
        patcher = comfy.sd.load_diffusion_model(path, model_options=options, disable_dynamic=True)
    refuse_needs_image(patcher.model)
    patcher = apply_graph_patches(patcher, opts.loras, opts.lora_dirs, opts.model_sampling, device)
    base = patcher.model
    block_swap.place(base, device, model_spec.offload_blocks)  # = base.to(device), but the last N blocks on the host (storage dtype kept)
    base.requires_grad_(False)
    base.eval()
    if cast_per_layer(base.diffusion_model, dtype):
        base.manual_cast_dtype = dtype  # _apply_model casts inputs to this; the ops cast weights to the input's dtype
    if gradient_checkpointing:
        _checkpoint_blocks(base.diffusion_model)
    patcher.pre_run()  # what ComfyUI's sampler does first: the model knows its patcher (current_patcher)

    vae = None
    vae_path = opts.vae
    if vae_path:
        if kind == "checkpoint" and vae_path == path:
            vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=False, output_model=False)[2]
        else:
            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_path))

    shape = latent_shape(base.latent_format, vae, opts.width, opts.height, opts.length)
    return ComfyPolicy(patcher, vae, conds, shape, device, opts.length, opts.guidance)
