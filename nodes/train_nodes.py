"""E-GRPO Train LoRA (starts a background job, returns its id at once) and E-GRPO Job (waits, reports).

The node only builds a job spec (egrpo_backend.config.JobSpec) and hands it to the job manager;
the training runs in a child process. The job id is `NAME-<hash>` of the spec and the identity of
the model files, so re-queuing an unchanged graph finds the existing job instead of starting a
duplicate, and a changed input or seed starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from comfy_api.latest import io
from egrpo_backend.config import ComfySpec

from . import comfy_glue, job_checks, types
from .clip_files import clip_record
from .images import blank_image, png_to_image
from .job_manager import get_manager

log = logging.getLogger("egrpo")
SOURCES = ["default", "comfy"]
DEVICES = ["auto", "cpu", "cuda"]


def _presets() -> list[str]:
    from egrpo_backend.method.algorithms import PRESETS

    return list(PRESETS)


def job_id_for(name: str, spec: dict, identity: dict, gpus: int = 1) -> str:
    """NAME-<12 hex> from the canonical JSON of the spec, the model files' identity and (when > 1) gpus."""
    key = {"spec": spec, "identity": identity, **({"gpus": gpus} if gpus > 1 else {})}  # gpus = 1 keeps its ids
    blob = json.dumps(key, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def build_spec(*, source, name, reward, prompts, preset, iterations, group_size, prompts_per_iteration, steps, shift,
               eta, tau, active, lr, clip_range, lora_rank, seed, device="auto", plan=None, overrides="",
               input_dir=None) -> dict:
    """The job spec dict from the node's inputs (validated by the caller with JobSpec.from_dict).

    spec_overrides is merged in after job_checks.refuse_node_keys: a key an input sets, or one the
    source would ignore, is refused by name; every other key is applied (and validated by JobSpec)."""
    algorithm = {"preset": preset, "steps": steps, "shift": shift, "eta": eta, "tau": tau, "active": active,
                 "group_size": group_size, "clip_range": clip_range}
    if plan is not None:  # the plan's grid and settings replace the widgets
        algorithm.update(sigmas=list(plan.sigmas), steps=plan.num_steps, eta=plan.eta, tau=plan.tau,
                         active=plan.active, diffusion=plan.diffusion)
    spec = {
        "model": {"source": source},
        "prompts": dict(prompts) if isinstance(prompts, dict) else list(prompts or []),  # a dict: a large file, streamed
        "rewards": [dict(r) for r in reward],
        "algorithm": algorithm,
        "lora": {"rank": lora_rank, "alpha": float(lora_rank)},
        "train": {"iterations": iterations, "prompts_per_iteration": prompts_per_iteration, "lr": lr, "seed": seed,
                  "device": device, "sample_every": 1, "checkpoint_every": max(1, min(10, iterations // 4 or 1))},
        "output": {"name": name, "formats": ["kohya", "comfy"] if source == "comfy" else ["peft", "kohya"]},
    }
    extra = job_checks.parse_overrides(overrides)
    job_checks.refuse_node_keys(extra, source, plan is not None)
    job_checks.refuse_graph_keys(extra)
    extra = job_checks.resolve_prompt_files(extra, comfy_glue.input_dir() if input_dir is None else input_dir)
    return _merge(spec, extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def comfy_model_files(model, vae, vae_name: str = "") -> dict:
    """The files the child loads: from the core loaders' records, or a clear error."""
    src = comfy_glue.patcher_source(model)
    if not src.get("paths"):
        raise ValueError("cannot tell which file this MODEL was loaded from: load it with the core 'Load Diffusion "
                         "Model' (UNETLoader) or 'Load Checkpoint' node (a custom loader does not record its file)")
    kind = "checkpoint" if "checkpoint" in src["loader"] else "diffusion_model"
    files = {"path": src["paths"][0], "kind": kind}
    vsrc = comfy_glue.patcher_source(vae) if vae is not None else {}
    if vae_name:
        import folder_paths

        files["vae"] = folder_paths.get_full_path_or_raise("vae", vae_name)
    elif vsrc.get("paths"):
        files["vae"] = vsrc["paths"][0]
    elif kind == "checkpoint":
        files["vae"] = files["path"]
    else:
        raise ValueError("cannot tell which file this VAE was loaded from: load it with the core 'Load VAE' node or "
                         "type its file name in vae_name")
    return files


NODE_CONDS = "node_conds"  # in the job folder: what the node encoded (policies/cond_store.py layout, never evicted)
NODE_CHUNK = 256  # prompts encoded and written per chunk when the node encodes the training set itself


def encode_prompts(clip, prompts, folder: Path, progress=None) -> int:
    """Encode each prompt with the node's CLIP once, in ComfyUI's process, and store its WHOLE conditioning
    (every tensor and option `encode_from_tokens_scheduled` returns; policies/comfy_conds.py) in the job's
    node cache, NODE_CHUNK prompts at a time: one small file per prompt, nothing held beyond a chunk."""
    from egrpo_backend.policies.comfy_clip import encode_conditioning
    from egrpo_backend.policies.comfy_conds import COMFY_FAMILY, conditioning_to_cond
    from egrpo_backend.policies.cond_store import CondStore

    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted earlier attempt left may come from other files
    store = CondStore(lambda p: conditioning_to_cond(p, encode_conditioning(clip, p)), COMFY_FAMILY, folder=folder,
                      disk_bytes=float("inf"), memory_bytes=0)
    chunk, done = [], 0
    for p in prompts:
        chunk.append(p)
        if len(chunk) == NODE_CHUNK:
            done += store.ensure(chunk)
            chunk = []
            if progress is not None:
                progress(done)
            comfy_glue.check_interrupt()
    done += store.ensure(chunk)
    return store.encoded


def node_texts(job, training: bool) -> tuple:
    """(texts, how many) the node encodes: the held-out prompts and the negative prompt (used with CFG);
    with `training` (the job cannot encode), every text the job encodes (build.texts_to_encode),
    streamed: a file set is never read whole."""
    from itertools import chain

    from egrpo_backend.jobs.build import eval_pairs, training_prompts

    held_out = list(dict.fromkeys(p for p, _ in eval_pairs(job)))
    negative = [job.algorithm.negative_prompt] if training or job.algorithm.guidance_scale != 1 else []
    if not training:
        return held_out + negative, len(held_out) + len(negative)
    prompts = training_prompts(job)
    return chain(prompts, held_out, negative), len(prompts) + len(held_out) + len(negative)


def comfy_graph_keys(model, shift: float, plan) -> dict:
    """model.comfy keys for what the graph did to the MODEL (LoRAs, ModelSampling), or a node error naming
    what cannot be carried (nodes/graph_patches.py) or what the model needs besides prompts."""
    from egrpo_backend.policies.comfy_graph import image_input_needed

    from .graph_patches import equivalent_shift, record_graph_patches

    base = getattr(getattr(model, "patcher", model), "model", None)
    why = image_input_needed(base) if base is not None else None
    if why:
        raise ValueError(f"{why}; E-GRPO trains on prompts only (no (prompt, reference image) pairs yet): load the "
                         "text-to-image / text-to-video model of this family")
    keys = record_graph_patches(model)
    graph_shift = equivalent_shift(keys["model_sampling"])
    if plan is None and graph_shift is not None and abs(graph_shift - shift) > 1e-3 * max(1.0, graph_shift):
        raise ValueError(f"the MODEL's ModelSampling node shifts the sampler's schedule by {graph_shift:.4g} but the "
                         f"shift input is {shift:.4g}: the training grid would not be the one the graph samples; set "
                         f"shift to {graph_shift:.4g} (or remove the ModelSampling node)")
    return keys


def check_latent(model, width: int, height: int, length: int) -> None:
    """The job's latent shape for this MODEL (egrpo_backend/policies/comfy_latents.py), checked here so that
    frames on an image model, or an audio / 3D model, are the node's error and not a failed job."""
    from egrpo_backend.policies.comfy_latents import latent_shape

    latent_format = getattr(getattr(getattr(model, "patcher", model), "model", None), "latent_format", None)
    if latent_format is not None:
        latent_shape(latent_format, None, width, height, length)


class TrainLoraNode(io.ComfyNode):
    """Starts an E-GRPO LoRA training job in the background and returns its JOB id within seconds."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EGRPOTrainLora", display_name="E-GRPO Train LoRA (background)", category=types.CATEGORY,
            description="Creates a training job (a child process, one at a time) and returns at once; watch it in "
                        "the E-GRPO sidebar or with an E-GRPO Job node.",
            inputs=[
                io.Combo.Input("source", options=SOURCES, default="default",
                               tooltip="default = the embedded digits model (CPU, no inputs needed); comfy = the MODEL, "
                                       "CLIP and VAE connected below (loaded again in the job with ComfyUI's loaders)."),
                types.Reward.Input("reward", tooltip="What to maximise (a reward node or a combination)."),
                io.String.Input("name", default="egrpo_lora", tooltip="LoRA file name (letters, digits, . _ -): it lands "
                                                                    "in loras/egrpo/NAME.safetensors."),
                io.Combo.Input("preset", options=_presets(), default="egrpo",
                               tooltip="Algorithm: egrpo (paper), egrpo_fast, granular, dance, flowgrpo, flowgrpo_fast, "
                                       "mixgrpo, nft / nft_multi_reward (DiffusionNFT: ODE rollouts, no CFG; eta, tau, "
                                       "active and clip_range do not apply). The widgets below override the preset's "
                                       "values."),
                io.Int.Input("iterations", default=20, min=1, max=100000, tooltip="Outer iterations (rollout -> reward "
                                                                                   "-> update)."),
                io.Int.Input("group_size", default=8, min=2, max=256, tooltip="G: images per group (same prompt, "
                                                                               "same branch step)."),
                io.Int.Input("prompts_per_iteration", default=2, min=1, max=1024, tooltip="Prompts rolled out per "
                                                                                          "iteration."),
                io.Int.Input("steps", default=16, min=2, max=1000, tooltip="T: sampling steps of the training grid."),
                io.Float.Input("shift", default=3.0, min=0.01, max=100.0, step=0.01, tooltip="Timestep shift of the grid."),
                io.Float.Input("eta", default=0.7, min=0.01, max=10.0, step=0.01, tooltip="SDE noise level a."),
                io.Float.Input("tau", default=2.2, min=0.0, max=100.0, step=0.01, tooltip="Entropy threshold for "
                                                                                            "merging (0 = off)."),
                io.String.Input("active", default="0-7", tooltip="Trained (branch) steps: '0-7', '0,2,4', 'all'."),
                io.Float.Input("lr", default=3e-4, min=1e-7, max=1.0, step=1e-5, tooltip="AdamW learning rate."),
                io.Float.Input("clip_range", default=0.2, min=1e-6, max=10.0, step=1e-4,
                               tooltip="PPO clip epsilon (paper 1e-4; a small LoRA learns faster with ~0.2)."),
                io.Int.Input("lora_rank", default=8, min=1, max=256, tooltip="LoRA rank (alpha = rank)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of rollouts and prompt order; a new seed starts a new job."),
                types.Prompts.Input("prompts", optional=True, tooltip="Training prompts (E-GRPO Prompt List); optional "
                                                                      "for the default model."),
                io.Model.Input("model", optional=True, tooltip="source = comfy: the model to train (from Load "
                                                               "Diffusion Model or Load Checkpoint)."),
                io.Clip.Input("clip", optional=True, tooltip="source = comfy: the job loads its files again and encodes "
                                                             "the prompts as needed (a custom loader's CLIP: encoded "
                                                             "here, before the job starts)."),
                io.Vae.Input("vae", optional=True, tooltip="source = comfy: decodes rollouts for the reward."),
                io.String.Input("vae_name", default="", optional=True, advanced=True,
                                tooltip="source = comfy: VAE file name in models/vae when the VAE's file cannot be "
                                        "found from the VAE input."),
                io.Float.Input("guidance", default=ComfySpec.guidance, min=-1.0, max=100.0, step=0.1, optional=True,
                               advanced=True, tooltip="source = comfy: -1 = as the graph samples (the model's own "
                                                      "default: 3.5 for Flux-dev, none for Chroma); 0 or more = what "
                                                      "a FluxGuidance node would set, on every prompt."),
                io.Int.Input("width", default=ComfySpec.width, min=64, max=4096, step=16, optional=True,
                             tooltip="source = comfy: width in pixels of the images the job samples and scores "
                                     "(a multiple of 16); the embedded digits model is always 16 x 16."),
                io.Int.Input("height", default=ComfySpec.height, min=64, max=4096, step=16, optional=True,
                             tooltip="source = comfy: height in pixels of the images the job samples and scores "
                                     "(a multiple of 16)."),
                types.Plan.Input("plan", optional=True, tooltip="An EGRPO_PLAN: its grid, eta, tau and active steps "
                                                               "replace the widgets."),
                io.Combo.Input("device", options=DEVICES, default="auto", optional=True, advanced=True,
                               tooltip="Where the job trains (auto = CUDA when available)."),
                io.Int.Input("gpus", default=1, min=1, max=64, optional=True, advanced=True,
                             tooltip="Data-parallel ranks: more than 1 launches torchrun with one process per GPU "
                                     "(on CPU: gloo ranks, one thread each). prompts_per_iteration must be "
                                     "divisible by it; 1 = one process, as before."),
                io.String.Input("spec_overrides", default="", multiline=True, optional=True, advanced=True,
                                tooltip="JSON merged into the job spec for settings without an input here, e.g. "
                                        "{\"train\": {\"minibatches\": 4}}. Every key is applied or refused by "
                                        "name (a key an input sets is refused: set the input)."),
                # last, so saved graphs keep their widget order
                io.Int.Input("length", default=ComfySpec.length, min=1, max=10000, step=4, optional=True,
                             tooltip="source = comfy, video models (Wan, HunyuanVideo): frames per sample, as "
                                     "ComfyUI's empty video latent nodes take it (e.g. 33, 81); 1 for image models."),
            ],
            outputs=[types.Job.Output(display_name="job", tooltip="The job, for an E-GRPO Job node."),
                     io.String.Output(display_name="job_id", tooltip="The job's id: its folder in output/egrpo_jobs "
                                                                     "and its row in the E-GRPO sidebar.")],
        )

    @classmethod
    def execute(cls, source, reward, name, preset, iterations, group_size, prompts_per_iteration, steps, shift, eta,
                tau, active, lr, clip_range, lora_rank, seed, prompts=None, model=None, clip=None, vae=None,
                vae_name="", guidance=ComfySpec.guidance, width=ComfySpec.width, height=ComfySpec.height, plan=None,
                device="auto", gpus=1, spec_overrides="", length=ComfySpec.length) -> io.NodeOutput:
        from egrpo_backend.config import JobSpec
        from egrpo_backend.paths import check_name
        from egrpo_backend.jobs.preflight import preflight

        check_name(name, "name")
        if not reward:
            raise ValueError("connect a reward node (e.g. E-GRPO Reward: digit_probability)")
        spec = build_spec(source=source, name=name, reward=reward, prompts=prompts, preset=preset, iterations=iterations,
                          group_size=group_size, prompts_per_iteration=prompts_per_iteration, steps=steps, shift=shift,
                          eta=eta, tau=tau, active=active, lr=lr, clip_range=clip_range, lora_rank=lora_rank, seed=seed,
                          device=device, plan=plan, overrides=spec_overrides)
        identity = {}
        if isinstance(prompts, dict):  # a streamed prompt file: a changed file is a new job
            from egrpo_backend.prompt_sets import open_prompts

            identity["prompts"] = open_prompts(prompts, "prompts").digest()
        manager = get_manager()
        if source == "comfy":
            if model is None or clip is None or vae is None:
                raise ValueError("source = comfy needs the MODEL, CLIP and VAE inputs connected")
            if not prompts:
                raise ValueError("source = comfy needs prompts: connect an E-GRPO Prompt List")
            files = comfy_model_files(model, vae, vae_name)
            graph = comfy_graph_keys(model, shift, plan)
            check_latent(model, width, height, length)
            clip_files, not_reloadable = clip_record(clip)
            identity = {**identity, **files, "clip": comfy_glue.patcher_source(clip).get("paths", [])}
            spec["model"]["path"] = files["path"]
            # Overrides cannot hold these keys (refused above): anything left there is unknown and JobSpec names it.
            spec["model"]["comfy"] = {**spec["model"].get("comfy", {}), "comfy_root": comfy_glue.comfy_root(),
                                      "kind": files["kind"], "vae": files["vae"], "guidance": guidance,
                                      "width": width, "height": height, "length": length, **graph}
            if clip_files:  # the job reloads the CLIP and encodes training prompts as needed
                spec["model"]["comfy"]["clip"] = clip_files
        elif prompts is None:
            spec["prompts"] = []
        job_id = job_id_for(name, spec, identity, gpus)
        job_dir = manager.job_dir(job_id)
        if source == "comfy":
            spec["model"]["comfy"]["cond_cache"] = str(job_dir / NODE_CONDS)
        job = JobSpec.from_dict(spec)  # every mistake is reported here, before anything is written
        preflight(job)  # what the job would refuse on this machine (device, files, prompt rules), before any file
        job_checks.check_gpus(gpus, job.train.device, job.train.prompts_per_iteration)
        fallback = ""
        if source == "comfy" and not (job_dir / "job.json").exists():
            if not clip_files:
                fallback = (f"the CLIP cannot be loaded again in the job ({not_reloadable}), so this node encodes every "
                            "training prompt itself, before the job starts; load it with a core CLIP loader "
                            "(Load CLIP, DualCLIPLoader, Load Checkpoint) to have the job encode them as needed")
                log.warning("E-GRPO %s: %s", job_id, fallback)
                comfy_glue.send_event("egrpo.event", {"job": job_id, "type": "notice", "message": fallback})
            texts, total = node_texts(job, training=not clip_files)
            bar = comfy_glue.progress_bar(max(1, total))

            def progress(done):  # the node's bar, the log and the panel's encoding bar (an `encode` event)
                bar.update_absolute(done, max(1, total))
                log.info("E-GRPO %s: the node encoded %d of %d prompts", job_id, done, total)
                comfy_glue.send_event("egrpo.event", {"job": job_id, "type": "encode", "done": done, "total": total,
                                                      "set_size": total, "by": "node"})

            encode_prompts(clip, texts, job_dir / NODE_CONDS, progress=progress if not clip_files else None)
            if not clip_files:
                progress(total)
        manager.submit(spec, job_id, gpus=gpus)
        if fallback:  # in the job's events too, so the panel and `events.jsonl` say why the node took long
            from egrpo_backend.jobs.folder import EventLog

            EventLog(job_dir).emit("notice", message=fallback)
        return io.NodeOutput(job_id, job_id)


class JobNode(io.ComfyNode):
    """A job's result: waits for it (or reports its state now), the LoRA name, the reward curve, the status."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EGRPOJob", display_name="E-GRPO Job", category=types.CATEGORY,
            description="Waits for a training job (or reports its state now): its LoRA name for LoraLoader, its "
                        "reward curve and a status line that says why it waits or how it ended.",
            inputs=[types.Job.Input("job", tooltip="A job from E-GRPO Train LoRA."),
                    io.Boolean.Input("wait", default=True, tooltip="Wait for the job to end (Cancel in the queue stops "
                                                                    "waiting, not the job); off = report its state now."),
                    io.Int.Input("timeout_minutes", default=0, min=0, max=100000,
                                 tooltip="Stop waiting after this many minutes (0 = no limit).")],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The LoRA as the core LoraLoader lists it "
                                                                        "(egrpo/NAME.safetensors); empty for the "
                                                                        "embedded digits model, whose LoRA stays in "
                                                                        "the job folder."),
                     io.Image.Output(display_name="reward_curve", tooltip="Training and held-out reward per iteration."),
                     io.String.Output(display_name="status", tooltip="State, iteration, reward, the message (why it "
                                                                     "waits, how it ended) and the LoRA's path.")],
        )

    @classmethod
    def execute(cls, job, wait=True, timeout_minutes=0) -> io.NodeOutput:
        manager = get_manager()
        info = manager.get(job)
        if wait:
            bar = comfy_glue.progress_bar(max(1, info["total"]))
            deadline = time.time() + timeout_minutes * 60 if timeout_minutes else None
            while info["status"] in ("queued", "running"):
                bar.update_absolute(info["iteration"], max(1, info["total"]))
                comfy_glue.check_interrupt()
                if deadline and time.time() > deadline:
                    break
                time.sleep(manager.poll_seconds)
                info = manager.get(job)
            if info["status"] == "failed":
                raise RuntimeError(f"E-GRPO job {job} failed: {info['message']}")
        curve = manager.root / job / "reward_curve.png"
        image = png_to_image(curve) if curve.is_file() else blank_image()
        status = f"{info['status']}: iteration {info['iteration']}/{info['total']}"
        if info.get("reward_mean") is not None:
            status += f", reward {info['reward_mean']:.4f}"
        if info.get("message"):
            status += f"\n{info['message']}"
        if info.get("lora"):
            status += f"\nLoRA: {info['lora']}"
        return io.NodeOutput(info.get("lora_name") or "", image, status)


NODES = [TrainLoraNode, JobNode]
