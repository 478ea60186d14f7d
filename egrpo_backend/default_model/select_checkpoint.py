"""Pick the pretraining checkpoint to ship as the base model and install it into weights/.

    python -m egrpo_backend.default_model.select_checkpoint --run runs/base [--step N]

Rule (when --step is not given): among checkpoints whose held-out p(named digit) lies in
[--low, --high] (default 0.4-0.7, leaving room for RL to improve), the one closest to --target.
The installed files are then loaded back and evaluated from scratch; training.json records the
re-measured numbers, so what it says is what the committed weights do.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from .classifier import accuracy, get_classifier
from .digits import real_digits
from .evaluate import heldout_report
from .metrics import nearest_real_distance, within_prompt_diversity
from .model import CONFIG_FILE, WEIGHTS_DIR, WEIGHTS_FILE, load_transformer
from .rewards import digit_probability
from .sampling import make_sample_fn
from .text import get_text_encoder

logger = logging.getLogger(__name__)


def read_history(run: Path) -> list[dict]:
    """The evaluation records of a train_base run folder."""
    path = Path(run) / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: pass the --out folder of a train_base run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def choose(history: list[dict], low: float, high: float, target: float) -> dict:
    """The record in [low, high] closest to target; raises if none qualifies."""
    ok = [r for r in history if low <= r["mean"] <= high]
    if not ok:
        scores = ", ".join(f"{r['step']}: {r['mean']:.3f}" for r in history)
        raise ValueError(f"no checkpoint has held-out p(named digit) in [{low}, {high}] (step: score = {scores})")
    return min(ok, key=lambda r: (abs(r["mean"] - target), r["step"]))


def real_digit_reference() -> dict:
    """The hacking guards measured on REAL digits (train split, grouped by label), for comparison."""
    images, labels = real_digits("train")
    return {"diversity": within_prompt_diversity(images, labels), "nearest_real": nearest_real_distance(images)}


def install(run: Path, record: dict, dest: Path = WEIGHTS_DIR) -> dict:
    """Copy the checkpoint into dest, re-evaluate it from the copied files, write training.json."""
    src = Path(run) / f"step_{record['step']:06d}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(src / name, dest / name)
    transformer = load_transformer(dest)
    eval_steps, shift = 16, 3.0
    report = heldout_report(make_sample_fn(transformer, get_text_encoder(), eval_steps, shift), digit_probability())
    run_info = json.loads((Path(run) / "run.json").read_text())
    info = {
        "step": record["step"],
        "seed": run_info["args"]["seed"],
        "train_seconds": record["train_seconds"],
        "command": run_info["command"],
        "reproduce_note": "the loop is deterministic per step, so --steps equal to 'step' gives the same weights",
        "params": sum(p.numel() for p in transformer.parameters()),
        "heldout": {
            "reward": "digit_probability",
            "eval_set": "heldout_eval_set(): 10 digits x 20 seeds (10000+), ODE Euler, shifted_sigmas(16, 3.0), guidance 1",
            "mean": report["mean"],
            "ci95": report["ci"],
            "diversity": report["diversity"],
            "nearest_real": report["nearest_real"],
        },
        "real_digits": real_digit_reference(),
        "classifier_heldout_accuracy": accuracy(get_classifier()),
        "recorded_during_training": {k: record[k] for k in ("mean", "ci", "diversity", "nearest_real")},
    }
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # the shipped files are the checkpoint, byte for byte
        if (src / name).read_bytes() != (dest / name).read_bytes():
            raise RuntimeError(f"copy of {src / name} differs from the source")
    (dest / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the --out folder of a train_base run")
    p.add_argument("--step", type=int, help="install this step instead of applying the rule")
    p.add_argument("--low", type=float, default=0.4, help="lowest acceptable held-out score")
    p.add_argument("--high", type=float, default=0.7, help="highest acceptable held-out score")
    p.add_argument("--target", type=float, default=0.5, help="preferred held-out score")
    p.add_argument("--dest", default=str(WEIGHTS_DIR), help="where to install (default: the package's weights/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    history = read_history(Path(args.run))
    if args.step is None:
        record = choose(history, args.low, args.high, args.target)
    else:
        record = next((r for r in history if r["step"] == args.step), None)
        if record is None:
            raise SystemExit(f"step {args.step} not in {args.run}; evaluated steps: {[r['step'] for r in history]}")
    info = install(Path(args.run), record, Path(args.dest))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
