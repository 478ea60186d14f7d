"""Estimated peak GPU memory of E-GRPO training per model, resolution and batch: what fits on 16 / 24 / 48 / 80 GB.

    python bench/memory_estimate.py            # writes bench/results/memory_estimates.{json,md}, updates docs/memory.md

Method (docs/memory.md, "Estimates"): everything is built on the meta device from the published
configs (bench/scale_models.py), so nothing is allocated and any size runs on a laptop.
  1. Bytes counted exactly: transformer weights in their storage plan (blocks fp8, the rest bf16),
     LoRA (rank 8 on the attention projections) at 16 bytes per parameter (fp32 weight, gradient and
     two AdamW moments), the VAE and the reward model in bf16, the text encoders in bf16.
  2. Activation bytes measured, not modelled: bench/memory_trace.py replays each phase on meta tensors
     and records the peak of live storages beyond the weights (flash-attention memory for SDPA).
     The transformer is traced at its published depth (on meta a block costs nothing; a peak is a
     maximum over time, so a reduced-depth trace cannot be scaled up by the block count; what one
     more block adds, traced at 2 and 3 blocks, is reported beside it); rollout (no grad, rollout batch), update
     (forward + backward at the micro batch, gradient checkpointing on, and off for comparison), VAE
     decode (decode batch) and reward (CLIP ViT-H/14, its batch) are traced separately.
  3. Phase peak = resident bytes (transformer + LoRA state + VAE) + that phase's activations (+ the
     reward model in the reward phase: it is offloaded between scores). A card "fits" when
     1.1 x peak + 1 GiB (CUDA context, cuBLAS workspace, allocator slack) <= its memory.
  4. Block swap (model.offload_blocks, egrpo_backend/policies/block_swap.py): with the last N blocks on
     the host, every phase holds N blocks' bytes less and two swapped blocks more (the running one and the
     prefetched next); activations do not change. For a card, the fewest N that fits is reported, at the
     largest batches that fit with any N. The swapped bytes sit in pinned host memory.
  5. Families not traced (Wan 2.2 5B / 14B, HunyuanVideo, FLUX.2-dev, Z-Image: LARGE_FAMILIES in
     scale_models.py): weights, blocks and LoRA are counted exactly on meta from their published configs;
     activations are modelled from the traced families as batch x tokens x hidden x 2 bytes times
     c_rollout (rollout) or (a x blocks + b) (update), fitted on the traced rows at 1024 px and raised by
     the fit's worst error there (fit and error are written to the JSON); video decode as the 16-channel 2D VAE decoding 4 frames at a time at the frame
     size. These rows say "modelled".
Every number it writes is an estimate; bench/scale.py measures the same quantities on a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from memory_trace import trace_peak  # noqa: E402
from scale_models import (  # noqa: E402
    LARGE_FAMILIES, MODELS, VAE_16CH, LargeFamily, ModelCard, available, clip_h_on_meta, large_family_on_meta, on_meta,
    scaled_config, transformer_on_meta)

from egrpo_backend.policies.block_swap import PREFETCH_DEPTH, base_bytes, swappable_blocks  # noqa: E402

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
GIB = 2**30
CARDS_GB = (16, 24, 48, 80)
MICRO_BATCHES = (4, 2, 1)
ROLLOUT_BATCHES = (8, 2)
DECODE_BATCHES = (4, 1)
REWARD_BATCH, LORA_RANK = 8, 8
LORA_STATE_BYTES = 16  # per LoRA parameter: fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq
CONTEXT_GIB, SLACK = 1.0, 1.1  # outside the allocator's count, and its rounding / fragmentation


def phase_peaks(encode: float, resident: float, rollout: float, decode: float, reward: float, update: float):
    """GiB held in each phase (the resident weights plus that phase's own), and the peak of the phases after
    encoding (text encoders are freed before the first rollout)."""
    phases = {"encode": encode, "rollout": resident + rollout, "decode": resident + decode,
              "reward": resident + reward, "update": resident + update}
    return phases, max(v for k, v in phases.items() if k != "encode")


def fits(peak_gib: float, card_gb: int) -> bool:
    return SLACK * peak_gib + CONTEXT_GIB <= card_gb


# --- exact bytes -------------------------------------------------------------------------------------
def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def text_encoders_on_meta(card: ModelCard) -> list[torch.nn.Module]:
    """The pipeline's text encoders (published configs), bf16 on meta."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    t5 = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
                  feed_forward_proj="gated-gelu")
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768)
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu")
    if card.family == "flux":
        build = [lambda: T5EncoderModel(t5), lambda: CLIPTextModel(clip_l)]
    elif card.family == "sd3":
        build = [lambda: T5EncoderModel(t5), lambda: CLIPTextModelWithProjection(clip_l),
                 lambda: CLIPTextModelWithProjection(clip_g)]
    else:  # Qwen-Image: Qwen2.5-VL-7B
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config = Qwen2_5_VLConfig(
            text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584))
        build = [lambda: Qwen2_5_VLForConditionalGeneration(config)]
    return [on_meta(b).to(BF16) for b in build]


def lora_parameters(model: torch.nn.Module) -> int:
    from egrpo_backend import lora

    lora.add_lora(model, lora.LoraSettings(rank=LORA_RANK), seed=0)
    return sum(p.numel() for p in lora.lora_parameters(model))


# --- measured activations ----------------------------------------------------------------------------
def _policy(card: ModelCard, depths: dict, res: int, checkpointing: bool):
    from egrpo_backend import lora
    from egrpo_backend.policies.diffusers_policy import DiffusersPolicy
    from scale_models import RandomConds

    config_card = ModelCard(**{**card.__dict__, "config": {**card.config, **depths}})
    model = transformer_on_meta(config_card, None, BF16, FP8)
    policy = DiffusersPolicy(model, RandomConds(card, BF16), (16, res // 8, res // 8), family=card.family,
                             device="meta", dtype=BF16, weight_dtype=FP8, gradient_checkpointing=checkpointing)
    lora.add_lora(policy.lora_model(), lora.LoraSettings(rank=LORA_RANK), seed=0)
    return policy


def _velocity_run(policy, card: ModelCard, batch: int, grad: bool):
    c, h, w = policy.latent_shape
    x = torch.empty(batch, c, h, w, device="meta", dtype=BF16)
    sigma = torch.empty(batch, device="meta", dtype=BF16)
    cond = {"encoder_hidden_states": torch.empty(batch, card.text_tokens, card.text_dim, device="meta", dtype=BF16)}
    if card.pooled_dim:
        cond["pooled_projections"] = torch.empty(batch, card.pooled_dim, device="meta", dtype=BF16)

    def run():
        with torch.set_grad_enabled(grad):
            v = policy.velocity(x, sigma, cond)
            if grad:
                v.float().square().mean().backward()
    return run


def transformer_activations(card: ModelCard, res: int, batch: int, grad: bool, checkpointing: bool = True) -> float:
    """Peak activation GiB of one velocity call (and its backward), traced at the published depth.

    On meta a block costs no memory and no arithmetic, so the whole model is traced: a peak is a
    maximum over time, not a sum over blocks (in the update it falls where the recompute of a big
    block meets the stored inputs of the blocks not yet through backward), so scaling a reduced-depth
    trace by the block count would be wrong in either direction."""
    policy = _policy(card, scaled_config(card, None), res, checkpointing)
    return trace_peak(_velocity_run(policy, card, batch, grad), policy.transformer) / GIB


def per_block_inputs(card: ModelCard, res: int) -> dict:
    """GiB each further block adds to the update's stored activations (micro batch 1, checkpointing on):
    traced at 2 and 3 blocks of each kind, a cross-check of the full-depth trace."""
    start = {k: min(2, scaled_config(card, None)[k]) for k in card.depth_keys}
    base_policy = _policy(card, _dual_fix(card, start), res, True)
    base = trace_peak(_velocity_run(base_policy, card, 1, True), base_policy.transformer)
    out = {}
    for k in card.depth_keys:
        more = _policy(card, _dual_fix(card, {**start, k: start[k] + 1}), res, True)
        out[k] = (trace_peak(_velocity_run(more, card, 1, True), more.transformer) - base) / GIB
    return out


def _dual_fix(card: ModelCard, depths: dict) -> dict:
    if "dual_attention_layers" in card.config:
        return {**depths, "dual_attention_layers": tuple(i for i in card.config["dual_attention_layers"] if i < depths["num_layers"])}
    return depths


def vae_decode_activations(res: int, batch: int, width: int = 0) -> tuple[float, float]:
    """(VAE weights GiB, peak decode activations GiB) for `batch` images of res x res (res x width)."""
    from diffusers import AutoencoderKL

    vae = on_meta(lambda: AutoencoderKL(**VAE_16CH)).to(BF16).to("meta").eval()
    z = torch.empty(batch, 16, res // 8, (width or res) // 8, device="meta", dtype=BF16)

    def run():
        with torch.no_grad():
            vae.decode(z, return_dict=False)
    return nbytes(vae) / GIB, trace_peak(run, vae) / GIB


def reward_activations(res: int, batch: int) -> tuple[float, float]:
    """(CLIP ViT-H/14 weights GiB, peak scoring activations GiB) for `batch` images of res x res."""
    from egrpo_backend.rewards.models.clip_similarity import ClipSimilarity
    from scale_models import ByteTokenizer

    reward = ClipSimilarity("clip_h", clip_h_on_meta(None).to(BF16), ByteTokenizer(), device="meta", dtype=BF16,
                            batch_size=batch)
    images = torch.empty(batch, 3, res, res, device="meta", dtype=torch.float32)

    def run():
        with torch.no_grad():
            reward.score(images, ["a prompt"] * batch)
    return nbytes(reward.model) / GIB, trace_peak(run, reward.model) / GIB


# --- block swap ----------------------------------------------------------------------------------------
def swap_phases(row: dict, n: int) -> dict:
    """The row's phase peaks with its last `n` blocks on the host (method step 4)."""
    blocks = row["blocks_gb"]
    if not n:
        return dict(row["phases_gb"])
    delta = PREFETCH_DEPTH * max(blocks[len(blocks) - n:]) - sum(blocks[len(blocks) - n:])
    return {k: v + delta for k, v in row["phases_gb"].items()}


def swap_fit(row: dict, card_gb: int) -> tuple[int, float] | None:
    """(fewest blocks to swap, peak GiB) for this row to fit the card; None if no count does."""
    for n in range(len(row["blocks_gb"]) + 1):
        phases = swap_phases(row, n)
        peak = max(v for k, v in phases.items() if k != "encode")
        if fits(peak, card_gb):
            return n, peak
    return None


def best_on_card(group: list[dict], card_gb: int) -> dict | None:
    """The largest batches that fit the card without swap; else the largest that fit with the fewest swapped blocks.
    Returns {"row", "swap", "peak_gb", "host_gb", "encode_fits"} or None."""
    ordered = sorted(group, key=lambda r: (-r["rollout_batch"], -r["micro_batch"], -r["decode_batch"]))
    plain = [r for r in ordered if r["fits"][str(card_gb)]]
    for row in plain[:1] or ordered:
        found = (0, row["peak_gb"]) if plain else swap_fit(row, card_gb)
        if found is None:
            continue
        n, peak = found
        blocks = row["blocks_gb"]
        encode = swap_phases(row, n)["encode"]
        return {"row": row, "swap": n, "peak_gb": peak, "host_gb": sum(blocks[len(blocks) - n:]) if n else 0.0,
                "encode_fits": fits(encode, card_gb)}
    return None


# --- modelled activations (families not traced) -------------------------------------------------------------
FIT_RESOLUTION = 1024
TRACED_TOKENS = {"flux-dev": (3072, 512), "qwen-image": (3072, 256), "sd3.5-large": (2432, 333), "sd3.5-medium": (1536, 333)}


def fit_activation_model(rows: list[dict]) -> dict:
    """Least-squares fit of the traced rows: rollout ~ c x B T D 2 bytes, update ~ (a x blocks + b) x B T D 2 bytes
    (T = image tokens + joined text tokens, D = hidden size); returns the coefficients and the worst relative error."""
    rollout, update = [], []
    for r in rows:  # the large-sequence regime only (1024 px): the modelled families run 4-14k tokens
        if r["model"] not in TRACED_TOKENS or r.get("modelled") or r["resolution"] != FIT_RESOLUTION:
            continue
        hidden, text = TRACED_TOKENS[r["model"]]
        unit = (r["resolution"] // 16) ** 2 + text
        unit = unit * hidden * 2 / GIB
        rollout.append((r["rollout_batch"] * unit, r["activations_gb"]["rollout"]))
        update.append((r["micro_batch"] * unit, len(r["blocks_gb"]), r["activations_gb"]["update"]))
    c = sum(x * y for x, y in rollout) / sum(x * x for x, _ in rollout)
    # update / (B unit) = a blocks + b: ordinary least squares on the per-unit values
    pts = [(n, y / x) for x, n, y in update]
    mean_n, mean_y = sum(n for n, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    a = sum((n - mean_n) * (y - mean_y) for n, y in pts) / sum((n - mean_n) ** 2 for n, _ in pts)
    b = mean_y - a * mean_n
    err_r = max(abs(c * x / y - 1) for x, y in rollout)
    err_u = max(abs((a * n + b) * x / y - 1) for x, n, y in update)
    return {"c_rollout": c, "a_update_per_block": a, "b_update": b, "max_rel_error_rollout": err_r,
            "max_rel_error_update": err_u, "points": len(rollout)}


def modelled_activations(fit: dict, tokens: int, hidden: int, blocks: int, batch: int, grad: bool) -> float:
    """The fitted model, raised by its worst error on the traced rows: a modelled estimate errs high."""
    unit = batch * tokens * hidden * 2 / GIB
    if grad:
        return unit * (fit["a_update_per_block"] * blocks + fit["b_update"]) * (1 + fit["max_rel_error_update"])
    return unit * fit["c_rollout"] * (1 + fit["max_rel_error_rollout"])


def _hidden(model: torch.nn.Module) -> int:
    """The width of the residual stream: the most common out_features among the blocks' Linear layers."""
    from collections import Counter

    widths = Counter(m.out_features for _, b in swappable_blocks(model) for m in b.modules() if isinstance(m, torch.nn.Linear))
    return widths.most_common(1)[0][0]


def estimate_large(family: LargeFamily, fit: dict, log=print) -> list[dict]:
    """Rows for a family that is not traced: exact bytes, modelled activations (method step 5)."""
    model = large_family_on_meta(family, BF16, FP8)
    weights, params = nbytes(model) / GIB, sum(p.numel() for p in model.parameters())
    hidden = _hidden(model)
    blocks_gib = [base_bytes(b) / GIB for _, b in swappable_blocks(model)]
    lora_params = lora_parameters(model)
    lora_gib = lora_params * LORA_STATE_BYTES / GIB
    text_gib = family.text_encoder_params * 2 / GIB
    reward_w, reward_act = reward_activations(512, REWARD_BATCH)
    rows = []
    for label, (tokens, text_tokens, frames, height, width) in family.shapes.items():
        seq = tokens + text_tokens
        per_decode = 4 if frames > 1 else 1  # frames decoded together per video (causal 3D VAEs decode in chunks)
        decode = {b: vae_decode_activations(height, b * per_decode if frames == 1 else per_decode, width)
                  for b in DECODE_BATCHES}
        vae_w = decode[DECODE_BATCHES[0]][0]
        resident = weights + lora_gib + vae_w
        rollout = {b: modelled_activations(fit, seq, hidden, len(blocks_gib), b, False) for b in ROLLOUT_BATCHES}
        update = {m: modelled_activations(fit, seq, hidden, len(blocks_gib), m, True) for m in MICRO_BATCHES}
        for rb in ROLLOUT_BATCHES:
            for m in MICRO_BATCHES:
                for db in DECODE_BATCHES:
                    phases, peak = phase_peaks(weights + text_gib, resident, rollout[rb], decode[db][1],
                                               reward_w + reward_act, update[m])
                    rows.append({"model": family.name, "resolution": label, "rollout_batch": rb, "micro_batch": m,
                                 "decode_batch": db, "reward_batch": REWARD_BATCH, "estimated": True, "modelled": True,
                                 "source": family.source, "text_encoder": family.text_encoder, "params": params,
                                 "tokens": seq, "hidden": hidden, "weights_gb": weights, "lora_params": lora_params,
                                 "lora_state_gb": lora_gib, "text_encoders_gb": text_gib, "vae_gb": vae_w, "reward_gb": reward_w,
                                 "activations_gb": {"rollout": rollout[rb], "decode": decode[db][1], "reward": reward_act,
                                                    "update": update[m]},
                                 "blocks_gb": blocks_gib, "phases_gb": phases, "peak_gb": peak,
                                 "fits": {str(c): fits(peak, c) for c in CARDS_GB},
                                 "encode_fits": {str(c): fits(phases["encode"], c) for c in CARDS_GB}})
        log(f"{family.name} {label}: {params / 1e9:.1f}B params, weights {weights:.2f} GiB in {len(blocks_gib)} blocks, "
            f"{seq} tokens x {hidden}, rollout(8) {rollout[8]:.2f}, update(1) {update[1]:.2f} GiB (modelled)")
    return rows


def load_rows(path: Path) -> list[dict]:
    """The rows of a memory_estimates.json, each with its model's blocks_gb (stored once per model)."""
    data = json.loads(Path(path).read_text())
    blocks = data.get("blocks_gb", {})
    return [{**r, "blocks_gb": blocks[r["model"]]} if r["model"] in blocks else r for r in data["rows"]]


def ensure_blocks(rows: list[dict]) -> None:
    """Add blocks_gb to rows written before block swap existed (counted on meta, no trace)."""
    cache: dict[str, list[float]] = {}
    for r in rows:
        if "blocks_gb" not in r:
            if r["model"] not in cache:
                model = transformer_on_meta(MODELS[r["model"]], None, BF16, FP8)
                cache[r["model"]] = [base_bytes(b) / GIB for _, b in swappable_blocks(model)]
            r["blocks_gb"] = cache[r["model"]]


# --- the table ---------------------------------------------------------------------------------------
def estimate(card: ModelCard, resolutions, log=print) -> list[dict]:
    model = transformer_on_meta(card, None, BF16, FP8)
    weights, params = nbytes(model) / GIB, sum(p.numel() for p in model.parameters())
    lora_params = lora_parameters(model)
    lora_gib = lora_params * LORA_STATE_BYTES / GIB
    encoders = text_encoders_on_meta(card)
    text_gib = sum(nbytes(e) for e in encoders) / GIB
    blocks_gib = [base_bytes(b) / GIB for _, b in swappable_blocks(model)]
    rows = []
    for res in resolutions:
        decode = {b: vae_decode_activations(res, b) for b in DECODE_BATCHES}
        vae_w = decode[DECODE_BATCHES[0]][0]
        reward_w, reward_act = reward_activations(res, REWARD_BATCH)
        resident = weights + lora_gib + vae_w
        rollout = {b: transformer_activations(card, res, b, grad=False) for b in ROLLOUT_BATCHES}
        update = {m: transformer_activations(card, res, m, grad=True) for m in MICRO_BATCHES}
        update_no_ckpt = transformer_activations(card, res, 1, grad=True, checkpointing=False)
        blocks = per_block_inputs(card, res)
        for rb in ROLLOUT_BATCHES:
            for m in MICRO_BATCHES:
                for db in DECODE_BATCHES:
                    phases, peak = phase_peaks(weights + text_gib, resident, rollout[rb], decode[db][1],
                                               reward_w + reward_act, update[m])
                    rows.append({"model": card.name, "resolution": res, "rollout_batch": rb, "micro_batch": m,
                                 "decode_batch": db, "reward_batch": REWARD_BATCH, "estimated": True, "params": params,
                                 "weights_gb": weights, "lora_params": lora_params, "lora_state_gb": lora_gib,
                                 "text_encoders_gb": text_gib, "vae_gb": vae_w, "reward_gb": reward_w,
                                 "activations_gb": {"rollout": rollout[rb], "decode": decode[db][1], "reward": reward_act,
                                                    "update": update[m], "update_micro1_no_checkpointing": update_no_ckpt},
                                 "per_block_update_gb": blocks, "blocks_gb": blocks_gib, "phases_gb": phases, "peak_gb": peak,
                                 "fits": {str(c): fits(peak, c) for c in CARDS_GB},
                                 "encode_fits": {str(c): fits(phases["encode"], c) for c in CARDS_GB}})
        log(f"{card.name} {res}px: weights {weights:.2f} GiB, LoRA {lora_params / 1e6:.1f}M params, rollout(8) "
            f"{rollout[8]:.2f}, update(1) {update[1]:.2f} (no checkpointing {update_no_ckpt:.2f}), decode(4) {decode[4][1]:.2f}, "
            f"reward {reward_act:.2f} GiB")
    return rows


def fit_cell(rows: list[dict], card_gb: int) -> str:
    """The largest batches that fit this card (rows of one model and resolution), marked estimated."""
    for row in sorted(rows, key=lambda r: (-r["rollout_batch"], -r["micro_batch"], -r["decode_batch"])):
        if row["fits"][str(card_gb)]:
            note = "" if row["encode_fits"][str(card_gb)] else " *"
            return (f"yes: rollout {row['rollout_batch']}, micro {row['micro_batch']}, decode {row['decode_batch']}{note} "
                    f"(est. {row['peak_gb']:.1f})")
    least = min(rows, key=lambda r: r["peak_gb"])
    return (f"no (est. {least['peak_gb']:.1f} at rollout {least['rollout_batch']}, micro {least['micro_batch']}, "
            f"decode {least['decode_batch']})")


def markdown(rows: list[dict]) -> str:
    lines = ["| model | px | weights GiB | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |",
             "|" + " --- |" * (3 + len(CARDS_GB))]
    keys = list(dict.fromkeys((r["model"], r["resolution"]) for r in rows))
    for model, res in keys:
        group = [r for r in rows if (r["model"], r["resolution"]) == (model, res)]
        lines.append(f"| {model} | {res} | {group[0]['weights_gb']:.1f} | " + " | ".join(fit_cell(group, c) for c in CARDS_GB) + " |")
    lines += ["", "All cells are estimates (bench/memory_estimate.py; method in the section above). Peak GiB in "
              "parentheses; batches: train.rollout_batch, train.micro_batch, train.decode_batch; G 8, reward batch 8, LoRA rank 8, gradient checkpointing on, fp8 "
              "weights. * = the text encoders do not fit beside the transformer on this card: encode the prompts "
              "where they fit (the job's `conds/` folder carries them over) or on the CPU."]
    return "\n".join(lines) + "\n"


def _label(group: list[dict]) -> str:
    return group[0]["model"] + (" †" if group[0].get("modelled") else "")


def _groups(rows: list[dict]):
    for model, res in dict.fromkeys((r["model"], r["resolution"]) for r in rows):
        yield res, [r for r in rows if (r["model"], r["resolution"]) == (model, res)]


def readme_table(rows: list[dict]) -> str:
    """One cell per card: fits at the default batches, with smaller ones, with block swap, or not (all estimated)."""
    def cell(group, card_gb):
        best = best_on_card(group, card_gb)
        if best is None:
            return "no"
        row, star = best["row"], "" if best["encode_fits"] else "*"
        batches = (row["rollout_batch"], row["micro_batch"], row["decode_batch"])
        text = "yes" + star
        if best["swap"]:
            text += f", swap {best['swap']}/{len(row['blocks_gb'])}"
        if batches != (8, 4, 4):
            text += f" (rollout {batches[0]}, micro {batches[1]}, decode {batches[2]})"
        return text

    lines = ["| model (fp8 weights) | px | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |", "|" + " --- |" * (2 + len(CARDS_GB))]
    for res, group in _groups(rows):
        lines.append(f"| {_label(group)} | {res} | " + " | ".join(cell(group, c) for c in CARDS_GB) + " |")
    return "\n".join(lines) + "\n"


def swap_table(rows: list[dict], fit: dict) -> str:
    """docs/memory.md: per card, the batches and the fewest swapped blocks that fit, the peak and the host memory."""
    def cell(group, card_gb):
        best = best_on_card(group, card_gb)
        if best is None:
            least = min(group, key=lambda r: r["peak_gb"])
            return f"no (all blocks swapped: est. {max(v for k, v in swap_phases(least, len(least['blocks_gb'])).items() if k != 'encode'):.1f})"
        row = best["row"]
        swap = f"swap {best['swap']}, host {best['host_gb']:.1f}" if best["swap"] else "no swap"
        return (f"{swap}; rollout {row['rollout_batch']}, micro {row['micro_batch']}, decode {row['decode_batch']}"
                f"{'' if best['encode_fits'] else ' *'} (est. {best['peak_gb']:.1f})")

    lines = ["| model | px | params | weights GiB | blocks (largest GiB) | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |",
             "|" + " --- |" * (5 + len(CARDS_GB))]
    for res, group in _groups(rows):
        r = group[0]
        lines.append(f"| {_label(group)} | {res} | {r['params'] / 1e9:.1f}B | {r['weights_gb']:.1f} | {len(r['blocks_gb'])} "
                     f"({max(r['blocks_gb']):.2f}) | " + " | ".join(cell(group, c) for c in CARDS_GB) + " |")
    sources = {r["model"]: (r["source"], r["text_encoder"]) for r in rows if r.get("modelled")}
    lines += ["", "Estimates with block swap (`model.offload_blocks`; method step 4): per card, the largest batches that fit, "
              "with the fewest blocks swapped (0 = no swap), the estimated peak GiB and the pinned host memory the swapped "
              "blocks take. * = the text encoders do not fit beside the resident weights: encode elsewhere or on the CPU.",
              "", f"† modelled activations (method step 5), fitted on {fit['points']} traced rows: rollout "
              f"{fit['c_rollout']:.1f} x B T D x 2 bytes, update ({fit['a_update_per_block']:.2f} x blocks + "
              f"{fit['b_update']:.1f}) x B T D x 2 bytes; worst error on the traced rows {fit['max_rel_error_rollout']:.0%} "
              f"(rollout) and {fit['max_rel_error_update']:.0%} (update), by which the modelled activations are raised. Weights, blocks and LoRA are exact (meta). "
              "Configs and text encoders: " + "; ".join(f"{m}: {src}, text encoder {te}" for m, (src, te) in sources.items())
              + ". Video shapes are 480 x 832, 33 frames; a video is one sample."]
    return "\n".join(lines) + "\n"


def flux_summary(rows: list[dict]) -> str:
    out = []
    for res in (512, 1024):
        for r in rows:
            if (r["model"], r["resolution"], r["rollout_batch"], r["decode_batch"]) == ("flux-dev", res, 8, 4):
                ph = r["phases_gb"]
                out.append(f"| {res} | {r['micro_batch']} | {r['peak_gb']:.1f} | {ph['rollout']:.1f} | {ph['decode']:.1f} "
                           f"| {ph['reward']:.1f} | {ph['update']:.1f} | {r['activations_gb']['update_micro1_no_checkpointing'] + r['weights_gb'] + r['lora_state_gb'] + r['vae_gb']:.1f} | {ph['encode']:.1f} |")
    head = ["FLUX.1-dev fp8, G 8 (rollout batch 8), decode batch 4, gradient checkpointing on, GiB (estimated):", "",
            "| px | micro | peak | rollout | decode | reward | update | update, micro 1, no checkpointing | encode (T5 + CLIP beside) |",
            "|" + " --- |" * 9]
    return "\n".join(head + out) + "\n"


def update_docs(doc: Path, sections: dict[str, str]) -> None:
    """Replace each `<!-- name:start -->...<!-- name:end -->` region of `doc` that it has."""
    text = doc.read_text(encoding="utf-8")
    for name, body in sections.items():
        text = re.sub(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", lambda m: m.group(1) + body + m.group(2),
                      text, flags=re.S)
    from egrpo_backend.atomic import atomic_write_text

    atomic_write_text(doc, text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--large", default=",".join(LARGE_FAMILIES), help="families with modelled activations ('' = none)")
    ap.add_argument("--resolutions", default="512,1024")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "memory.md"), help="updated between its estimate markers ('' = no)")
    ap.add_argument("--tables-only", action="store_true",
                    help="keep the traced rows of --out's memory_estimates.json (no trace); recompute swap and modelled rows")
    a = ap.parse_args(argv)
    from egrpo_backend.atomic import atomic_write_json, atomic_write_text

    out = Path(a.out)
    if a.tables_only:
        rows = [r for r in load_rows(out / "memory_estimates.json") if not r.get("modelled")]
    else:
        rows = []
        for name in a.models.split(","):
            card = MODELS[name]
            if available(card):
                rows += estimate(card, [int(r) for r in a.resolutions.split(",")])
    ensure_blocks(rows)
    fit = fit_activation_model(rows)
    import diffusers

    for name in filter(None, a.large.split(",")):
        family = LARGE_FAMILIES[name]
        if hasattr(diffusers, family.cls):
            rows += estimate_large(family, fit)
    method = __doc__[__doc__.index("Method"):].strip()
    blocks = {r["model"]: r["blocks_gb"] for r in rows}  # once per model, not per row
    atomic_write_json(out / "memory_estimates.json", {"method": method, "cards_gb": CARDS_GB, "activation_fit": fit,
                                                      "blocks_gb": blocks,
                                                      "rows": [{k: v for k, v in r.items() if k != "blocks_gb"} for r in rows]})
    traced = [r for r in rows if not r.get("modelled")]
    table, flux, swap = markdown(traced), flux_summary(traced), swap_table(rows, fit)
    atomic_write_text(out / "memory_estimates.md", table + "\n" + flux + "\n" + swap)
    if a.docs and Path(a.docs).is_file():
        update_docs(Path(a.docs), {"estimates": table, "flux": flux, "swap": swap})
        update_docs(ROOT / "README.md", {"memory-estimates": readme_table(rows)})
    print(table + "\n" + flux + "\n" + swap)
    return rows


if __name__ == "__main__":
    main()
