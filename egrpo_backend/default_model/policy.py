"""The embedded default as a FlowPolicy: a plain DiffusersPolicy (SD3 family, pixel space, no VAE).

Nothing in the engine special-cases it; it only brings its own prompts, held-out set and reward.
"""

from __future__ import annotations

import torch

from ..policies.diffusers_policy import DiffusersPolicy


def load_default_policy(device: torch.device | str = "cpu", cond_cache=None, cond_cache_gb: float = 20.0,
                        cond_memory_gb: float = 2.0) -> DiffusersPolicy:
    from .model import load_default_transformer
    from .text import get_text_encoder

    encoder = get_text_encoder()
    return DiffusersPolicy(load_default_transformer("cpu"), encoder.encode, (1, 16, 16), vae=None, family="sd3",
                           device=device, dtype=torch.float32, cond_cache=cond_cache, cond_cache_gb=cond_cache_gb,
                           cond_memory_gb=cond_memory_gb)


def default_job_inputs() -> dict:
    """Training prompts, held-out (prompt, seed) pairs, the diversity grouping (by named digit), the
    drift measure (distance to the nearest real held-out digit) and its LoRA targets: the attention
    projections it was measured with (README, docs/baselines.md), not the attention + MLP default of
    FLUX / SD3 (docs/lora_formats.md)."""
    from .digits import digit_of_prompt, heldout_eval_set, train_prompts
    from .metrics import nearest_real_distance

    return {"prompts": train_prompts(), "eval_pairs": heldout_eval_set(), "group_key": digit_of_prompt,
            "drift_fn": nearest_real_distance, "lora_targets": DIGITS_LORA_TARGETS}


DIGITS_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
