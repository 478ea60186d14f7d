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
    MODELS, VAE_16CH, ModelCard, available, clip_h_on_meta, on_meta, scaled_config, transformer_on_meta)

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
GIB = 2**30
CARDS_GB = (16, 24, 48, 80)
MICRO_BATCHES = (4, 2, 1)
ROLLOUT_BATCHES = (8, 2)
DECODE_BATCHES = (4, 1)
REWARD_BATCH, LORA_RANK = 8, 8
LORA_STATE_BYTES = 16  # per LoRA parameter: fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq
CONTEXT_GIB, SLACK = 1.0, 1.1  # outside the allocator's count, and its rounding / fragmentation


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


def vae_decode_activations(res: int, batch: int) -> tuple[float, float]:
    """(VAE weights GiB, peak decode activations GiB) for `batch` images of res x res."""
    from diffusers import AutoencoderKL

    vae = on_meta(lambda: AutoencoderKL(**VAE_16CH)).to(BF16).to("meta").eval()
    z = torch.empty(batch, 16, res // 8, res // 8, device="meta", dtype=BF16)

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


# --- the table ---------------------------------------------------------------------------------------
def estimate(card: ModelCard, resolutions, log=print) -> list[dict]:
    model = transformer_on_meta(card, None, BF16, FP8)
    weights, params = nbytes(model) / GIB, sum(p.numel() for p in model.parameters())
    lora_params = lora_parameters(model)
    lora_gib = lora_params * LORA_STATE_BYTES / GIB
    encoders = text_encoders_on_meta(card)
    text_gib = sum(nbytes(e) for e in encoders) / GIB
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
                    phases = {"encode": weights + text_gib, "rollout": resident + rollout[rb],
                              "decode": resident + decode[db][1], "reward": resident + reward_w + reward_act,
                              "update": resident + update[m]}
                    peak = max(v for k, v in phases.items() if k != "encode")
                    rows.append({"model": card.name, "resolution": res, "rollout_batch": rb, "micro_batch": m,
                                 "decode_batch": db, "reward_batch": REWARD_BATCH, "estimated": True, "params": params,
                                 "weights_gb": weights, "lora_params": lora_params, "lora_state_gb": lora_gib,
                                 "text_encoders_gb": text_gib, "vae_gb": vae_w, "reward_gb": reward_w,
                                 "activations_gb": {"rollout": rollout[rb], "decode": decode[db][1], "reward": reward_act,
                                                    "update": update[m], "update_micro1_no_checkpointing": update_no_ckpt},
                                 "per_block_update_gb": blocks, "phases_gb": phases, "peak_gb": peak,
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


def readme_table(rows: list[dict]) -> str:
    """One word per card: fits at the default batches, fits with smaller ones, or not (all estimated)."""
    def cell(group, card_gb):
        ok = sorted((r for r in group if r["fits"][str(card_gb)]),
                    key=lambda r: (-r["rollout_batch"], -r["micro_batch"], -r["decode_batch"]))
        if not ok:
            return "no"
        best = ok[0]
        star = "" if best["encode_fits"][str(card_gb)] else "*"
        if (best["rollout_batch"], best["micro_batch"], best["decode_batch"]) == (8, 4, 4):
            return "yes" + star
        return f"yes{star} (rollout {best['rollout_batch']}, micro {best['micro_batch']}, decode {best['decode_batch']})"

    lines = ["| model (fp8 weights) | px | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |", "|" + " --- |" * (2 + len(CARDS_GB))]
    for model, res in dict.fromkeys((r["model"], r["resolution"]) for r in rows):
        group = [r for r in rows if (r["model"], r["resolution"]) == (model, res)]
        lines.append(f"| {model} | {res} | " + " | ".join(cell(group, c) for c in CARDS_GB) + " |")
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
    ap.add_argument("--resolutions", default="512,1024")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "memory.md"), help="updated between its estimate markers ('' = no)")
    ap.add_argument("--tables-only", action="store_true", help="rewrite the tables from --out's memory_estimates.json")
    a = ap.parse_args(argv)
    from egrpo_backend.atomic import atomic_write_json, atomic_write_text

    out = Path(a.out)
    if a.tables_only:
        rows = json.loads((out / "memory_estimates.json").read_text())["rows"]
    else:
        rows = []
        for name in a.models.split(","):
            card = MODELS[name]
            if available(card):
                rows += estimate(card, [int(r) for r in a.resolutions.split(",")])
        method = __doc__[__doc__.index("Method"):].strip()
        atomic_write_json(out / "memory_estimates.json", {"method": method, "cards_gb": CARDS_GB, "rows": rows})
    table, flux = markdown(rows), flux_summary(rows)
    atomic_write_text(out / "memory_estimates.md", table + "\n" + flux)
    if a.docs and Path(a.docs).is_file():
        update_docs(Path(a.docs), {"estimates": table, "flux": flux})
        update_docs(ROOT / "README.md", {"memory-estimates": readme_table(rows)})
    print(table + "\n" + flux)
    return rows


if __name__ == "__main__":
    main()
