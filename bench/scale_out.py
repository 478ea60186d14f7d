"""Iteration time at 1 and 2 ranks on CPU (one thread each), same global batch: the speed-up.

    python bench/scale_out.py [--iterations 6]

Runs the embedded default model through `python -m egrpo_backend run JOB --nproc-per-node N` and times
iterations from the metrics events (the first is dropped as warm-up). Writes bench/results/scale_out.{json,md}.
The communication share is not measured yet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from egrpo_backend.config import JobSpec  # noqa: E402
from egrpo_backend.jobs import create_job, read_events  # noqa: E402


def spec(iterations: int) -> dict:
    return {"model": {"source": "default"}, "prompts": ["a handwritten digit three", "a handwritten digit seven"],
            "rewards": [{"name": "digit_probability"}], "algorithm": {"steps": 6, "active": "0-1", "group_size": 4},
            "lora": {"rank": 2, "alpha": 2.0},
            "train": {"iterations": iterations, "prompts_per_iteration": 4, "minibatches": 2, "checkpoint_every": iterations,
                      "evaluate": False, "device": "cpu", "threads": 1}, "output": {"name": "bench", "formats": ["peft"]}}


def seconds_per_iteration(ranks: int, iterations: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job"
        create_job(JobSpec.from_dict(spec(iterations)), job)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "egrpo_backend", "run", str(job), "--nproc-per-node", str(ranks), "--quiet"],
                       env=env, cwd=ROOT, check=True, capture_output=True)
        times = [e["time"] for e in read_events(job)[0] if e["type"] == "metrics"]
    return (times[-1] - times[0]) / (len(times) - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=6)
    args = ap.parse_args()
    result = {f"ranks_{n}": seconds_per_iteration(n, args.iterations) for n in (1, 2)}
    result["speedup"] = result["ranks_1"] / result["ranks_2"]
    result["note"] = "shared 2-core CPU machine (other jobs running), gloo, 1 thread per rank, global batch 4 prompts"
    out = ROOT / "bench" / "results"
    (out / "scale_out.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "scale_out.md").write_text(
        f"| ranks | s / iteration |\n|---|---|\n| 1 | {result['ranks_1']:.3f} |\n| 2 | {result['ranks_2']:.3f} |\n\n"
        f"Speed-up {result['speedup']:.2f}x. {result['note']}. Communication share: not measured yet.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
