"""Rectified-flow pretraining of the digits model (reproducible; a few CPU minutes).

    python -m egrpo_backend.default_model.train_base --out runs/base
    python -m egrpo_backend.default_model.select_checkpoint --run runs/base --step 2000

Loss: || v_theta(x_t, t, text) - (eps - x0) ||^2 with x_t = (1 - t) x0 + t eps, t ~ uniform (default:
the low-noise end is trained as often as the rest) or logit-normal (SD3's choice). Trains on the REAL 'train' split only, so
the held-out real split stays unseen for the nearest-real-digit metric. 10% of prompts are replaced by
"" so classifier-free guidance works. Every --eval-every steps a checkpoint is saved and scored on the
held-out (prompt, seed) set with ODE sampling (shifted grid, plain Euler, guidance 1); the scores go
to history.jsonl, from which select_checkpoint.py picks the base to install.

The defaults are the settings of the shipped base (step 2000). Noisy captions (--caption-noise 0.5:
half of the prompts name a random digit) give a base that draws CLEAN digits but follows the prompt
only ~40% of the time, like a model trained on noisy web captions: RL then has prompt adherence to
fix. Without caption noise every checkpoint in the 0.4-0.7 band was still speckled with noise (the
classifier read the digit before the images were clean), and RL gains then came with a loss of
diversity that is only denoising, which hides the signature of reward hacking.
The loop is deterministic per step (same machine type and --threads): evaluation draws from its own
generators, so --steps N and a longer run give identical weights at step N.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .digits import DIGIT_NAMES, TRAIN_TEMPLATES, prompt_for, real_digits, to_latent
from .evaluate import heldout_report
from .model import build_transformer, save_transformer, velocity
from .rewards import digit_probability
from .sampling import make_sample_fn
from .text import get_text_encoder

logger = logging.getLogger(__name__)
T_SAMPLING = ("logit_normal", "uniform")


def sample_t(n: int, mode: str, g: torch.Generator) -> torch.Tensor:
    """Training noise levels t in (0, 1): logit-normal(0, 1) or uniform."""
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=g))
    if mode == "uniform":
        return torch.rand(n, generator=g)
    raise ValueError(f"unknown t sampling {mode!r}; valid: {', '.join(T_SAMPLING)}")


def prompt_table(encoder) -> tuple[dict[str, torch.Tensor], int]:
    """Conditioning of all training prompts, row template * 10 + digit, plus "" in the last row."""
    prompts = [prompt_for(d, t) for t in TRAIN_TEMPLATES for d in range(len(DIGIT_NAMES))] + [""]
    return encoder.encode(prompts), len(prompts) - 1


def evaluate(transformer, encoder, reward, args) -> dict:
    """Held-out p(named digit) with CI, diversity and nearest-real distance (per_sample dropped)."""
    transformer.eval()
    report = heldout_report(make_sample_fn(transformer, encoder, args.eval_steps, args.shift), reward)
    transformer.train()
    report.pop("per_sample")
    return report


def train(args) -> list[dict]:
    """The pretraining loop; returns the evaluation history (one dict per checkpoint)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "command"}, "command": args.command}, indent=2) + "\n")
    images, labels = real_digits("train")
    x_all = to_latent(images)  # [N, 1, 16, 16] in [-1, 1]
    encoder, reward = get_text_encoder(), digit_probability()
    table, empty_row = prompt_table(encoder)
    transformer = build_transformer(seed=args.seed).train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = lambda step: min(1.0, (step + 1) / args.warmup)  # noqa: E731  (linear warmup, then constant)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    g = torch.Generator().manual_seed(args.seed)  # every random draw of the loop comes from here
    history, t0 = [], time.time()
    bar = tqdm(range(1, args.steps + 1), desc="pretrain", dynamic_ncols=True)
    for step in bar:
        # 1. batch: real digits, a random phrasing of each label, 10% "" for classifier-free guidance
        idx = torch.randint(0, x_all.shape[0], (args.batch_size,), generator=g)
        x0, digit = x_all[idx], labels[idx]
        if args.caption_noise > 0:  # noisy captions: a base that draws clean digits, often not the named one
            wrong = torch.rand(args.batch_size, generator=g) < args.caption_noise
            digit = torch.where(wrong, torch.randint(0, 10, (args.batch_size,), generator=g), digit)
        row = torch.randint(0, len(TRAIN_TEMPLATES), (args.batch_size,), generator=g) * 10 + digit
        row = torch.where(torch.rand(args.batch_size, generator=g) < args.cond_dropout, empty_row, row)
        cond = {k: v[row] for k, v in table.items()}
        # 2. rectified-flow target
        t = sample_t(args.batch_size, args.t_sampling, g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        loss = torch.nn.functional.mse_loss(velocity(transformer, x_t, t, cond), eps - x0)
        # 3. update
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        # 4. checkpoint + held-out evaluation
        if step % args.eval_every == 0 or step == args.steps:
            ckpt = save_transformer(transformer, out / f"step_{step:06d}")
            rec = {"step": step, "train_seconds": round(time.time() - t0, 1), "loss": loss.item(), **evaluate(transformer, encoder, reward, args)}
            (ckpt / "metrics.json").write_text(json.dumps(rec, indent=2) + "\n")
            with open(out / "history.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            history.append(rec)
            logger.info("step %d: held-out p(named digit) %.3f [%.3f, %.3f], diversity %.3f, nearest real %.3f",
                        step, rec["mean"], *rec["ci"], rec["diversity"], rec["nearest_real"])
    return history


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (every one recorded in run.json)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (checkpoints step_NNNNNN/, history.jsonl)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the init and every draw of the loop")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant after warmup)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--t-sampling", choices=T_SAMPLING, default="uniform", help="training noise levels")
    p.add_argument("--caption-noise", type=float, default=0.5,
                   help="fraction of training prompts that name a random digit (weak prompt adherence, clean images)")
    p.add_argument("--cond-dropout", type=float, default=0.1, help="fraction of prompts replaced by ''")
    p.add_argument("--eval-every", type=int, default=250, help="steps between checkpoints + evaluations")
    p.add_argument("--eval-steps", type=int, default=16, help="Euler steps of the evaluation ODE")
    p.add_argument("--shift", type=float, default=3.0, help="shift of the evaluation sigma grid")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machines are shared)")
    args = p.parse_args(argv)
    args.command = "python -m egrpo_backend.default_model.train_base " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> None:
    """CLI entry point."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    history = train(args)
    best = max(history, key=lambda r: r["mean"])
    print(f"done: {len(history)} checkpoints in {args.out}; best held-out p(named digit) {best['mean']:.3f} at step {best['step']}")


if __name__ == "__main__":
    main()
