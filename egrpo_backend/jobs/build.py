"""From a JobSpec to a ready Trainer: prompt checks, policy, LoRA, rewards. Jobs, benchmarks and
tests all build through here, so the order (check the prompts streamed -> policy -> LoRA -> Trainer,
which encodes the prompts of the next iterations ahead of use) is written once."""

from __future__ import annotations

from pathlib import Path

from .. import distributed
from .. import lora as lora_lib
from ..config import JobSpec
from ..policies import build_policy, resolve_device, resolve_dtype, source_defaults
from ..policies.base import FlowPolicy
from ..prompt_rules import check_prompt_rules
from ..rewards import WeightedRewards, build_reward
from ..method.trainer import ENCODE_CHUNK, Trainer

COND_CACHE = "conds"  # in the job folder: the encoded prompts, bounded by train.cond_cache_gb (docs/prompts.md)
DEFAULT_EVAL_SEEDS = range(10000, 10010)  # held-out noise seeds when the spec gives eval prompts but no seeds


def training_prompts(spec: JobSpec):
    """The training prompts as a sequence (a file set is streamed, never read whole)."""
    prompts = spec.prompt_set()
    return prompts if len(prompts) else source_defaults(spec.model).get("prompts", [])


def eval_pairs(spec: JobSpec) -> list[tuple[str, int]]:
    """Held-out (prompt, seed) pairs: the spec's eval prompts x eval seeds, or the model's own set."""
    if not spec.train.evaluate:
        return []
    if spec.eval_prompts:
        return [(p, s) for p in spec.prompt_list(eval=True) for s in (spec.eval_seeds or DEFAULT_EVAL_SEEDS)]
    return source_defaults(spec.model).get("eval_pairs", [])


def texts_to_encode(spec: JobSpec) -> list[str]:
    """Every text a job encodes: training prompts, held-out prompts and the negative prompt, once each.

    The ComfyUI node encodes exactly these into the job's cond cache (the default and diffusers
    sources encode as needed instead, docs/prompts.md): one list, so the two can never drift apart."""
    pairs = eval_pairs(spec)
    return list(dict.fromkeys(list(training_prompts(spec)) + [p for p, _ in pairs] + [spec.algorithm.negative_prompt]))


def build_rewards(spec: JobSpec) -> WeightedRewards:
    rewards = [build_reward(r["name"], **{k: v for k, v in r.items() if k not in ("name", "weight")}) for r in spec.rewards]
    return WeightedRewards(rewards, [float(r.get("weight", 1.0)) for r in spec.rewards])


def add_job_lora(policy: FlowPolicy, spec: JobSpec, job_dir: Path | None = None) -> None:
    from ..policies.block_swap import adopt_lora

    targets = (spec.lora.target_modules or checkpoint_targets(policy, spec, job_dir)
               or source_defaults(spec.model).get("lora_targets"))  # None: lora.py's default
    settings = lora_lib.LoraSettings(rank=spec.lora.rank, alpha=spec.lora.alpha, target_modules=targets or None,
                                     dtype=spec.lora.dtype)
    lora_lib.add_lora(policy.lora_model(), settings, seed=spec.lora.init_seed)
    adopt_lora(policy.lora_model())  # block swap: a LoRA made on the host beside a swapped block goes to the device


def checkpoint_targets(policy: FlowPolicy, spec: JobSpec, job_dir: Path | None) -> list[str] | None:
    """The modules the job's last checkpoint holds a LoRA on, when the spec names none: a job saved
    before the default targets grew (attention only, then attention and MLP: docs/lora_formats.md)
    resumes on its own modules instead of failing on the ones it never had. None: no checkpoint."""
    from .checkpoint import latest_checkpoint, read_checkpoint_lora

    ckpt = latest_checkpoint(job_dir) if job_dir is not None and not spec.lora.target_modules else None
    return sorted(read_checkpoint_lora(ckpt, model=policy.lora_model())) if ckpt is not None else None


def build_trainer(spec: JobSpec, *, policy: FlowPolicy | None = None, reward: WeightedRewards | None = None,
                  job_dir: Path | None = None) -> Trainer:
    """A Trainer for `spec`. A given policy (without a LoRA yet) or reward is used instead of building one."""
    check_prompt_rules(spec)  # the whole set, streamed, before a prompt is encoded
    if policy is None:
        device = distributed.rank_device(resolve_device(spec.train.device))
        policy = build_policy(spec.model, device, resolve_dtype(spec.model.dtype, device), cond_cache=cond_folder(job_dir),
                              cond_cache_gb=spec.train.cond_cache_gb, cond_memory_gb=spec.train.cond_memory_gb)
    if not policy.trainable_parameters():
        add_job_lora(policy, spec, job_dir)
    reward = reward or build_rewards(spec)
    prompts = training_prompts(spec)
    if not hasattr(policy, "encode_ahead"):  # a policy without a cond store: every text now
        policy.encode(texts_to_encode(spec))
        if hasattr(policy, "release_text_encoder"):
            policy.release_text_encoder()
    elif len(prompts) <= ENCODE_CHUNK:
        # A small set is encoded whole now and the text encoders leave memory (they reload only if an
        # evicted prompt is needed again); a large one is encoded chunk by chunk as training reaches it.
        policy.encode_ahead(texts_to_encode(spec))
        policy.release_text_encoder()
    else:  # the held-out and negative prompts in one session, now
        policy.encode_ahead(list(dict.fromkeys([p for p, _ in eval_pairs(spec)] + [spec.algorithm.negative_prompt])))
    return Trainer(policy, spec, reward, prompts)


def cond_folder(job_dir) -> Path | None:
    """The job's encoded prompts: one folder per rank (each rank encodes the prompts it draws)."""
    if not job_dir:
        return None
    world = distributed.world_size()
    return Path(job_dir) / (COND_CACHE if world == 1 else f"{COND_CACHE}-rank{distributed.rank()}")
