"""Iteration time at 1 and 2 ranks on CPU (one thread each), same global batch: the speed-up and the
communication share, with DDP and with FSDP2.

    python bench/scale_out.py [--iterations 8]

Runs the embedded default model through `python -m egrpo_backend run JOB --nproc-per-node N` and times
iterations from the metrics events (the first is dropped as warm-up). The communication share is rank 0's
seconds inside collectives (the metric comm_seconds: gradient all-reduce / reduce-scatter latency, gathers,
waiting for the slower rank) over its iteration time; FSDP2's all-gathers happen inside its forward
and are not timed, so its share is not reported. Writes bench/results/scale_out.{json,md}.
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
from egrpo_backend.jobs.run import create_job, read_events  # noqa: E402


def spec(iterations: int, parallel: str, device: str = "cpu") -> dict:
    return {"model": {"source": "default"}, "prompts": ["a handwritten digit three", "a handwritten digit seven"],
            "rewards": [{"name": "digit_probability"}], "algorithm": {"steps": 6, "active": "0-1", "group_size": 4},
            "lora": {"rank": 2, "alpha": 2.0},
            "train": {"iterations": iterations, "prompts_per_iteration": 4, "minibatches": 2, "checkpoint_every": iterations,
                      "evaluate": False, "device": device, "threads": 1, "parallel": parallel}, "output": {"name": "bench", "formats": ["peft"]}}


def timing(ranks: int, iterations: int, parallel: str = "ddp", device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job"
        create_job(JobSpec.from_dict(spec(iterations, parallel, device)), job)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "egrpo_backend", "run", str(job), "--nproc-per-node", str(ranks), "--quiet"],
                       env=env, cwd=ROOT, check=True, capture_output=True)
        metrics = [e for e in read_events(job)[0] if e["type"] == "metrics"]
    per_it = (metrics[-1]["time"] - metrics[0]["time"]) / (len(metrics) - 1)
    comm = sum(m.get("comm_seconds", 0.0) for m in metrics[1:]) / (len(metrics) - 1)
    measured = ranks == 1 or parallel == "ddp"  # FSDP2's per-block all-gathers run inside its forward, untimed
    return {"ranks": ranks, "parallel": parallel if ranks > 1 else "single", "seconds_per_iteration": per_it,
            "comm_seconds_per_iteration": comm if measured else None, "comm_share": comm / per_it if measured else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=8)
    args = ap.parse_args()
    rows = [timing(1, args.iterations), timing(2, args.iterations, "ddp"), timing(2, args.iterations, "fsdp")]
    for r in rows:
        r["speedup"] = rows[0]["seconds_per_iteration"] / r["seconds_per_iteration"]
    result = {"rows": rows, "note": "2-core CPU machine (other jobs may run), gloo, 1 thread per rank, "
                                    "global batch 4 prompts x G 4, embedded default model"}
    out = ROOT / "bench" / "results"
    (out / "scale_out.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| ranks | gradients by | s / iteration | speed-up | communication share |", "|---|---|---|---|---|"]
    lines += [f"| {r['ranks']} | {r['parallel']} | {r['seconds_per_iteration']:.3f} | {r['speedup']:.2f}x | "
              (f"{100 * r['comm_share']:.1f}% |" if r["comm_share"] is not None else "not measured (all-gathers inside FSDP) |")
              for r in rows]
    (out / "scale_out.md").write_text("\n".join(lines) + f"\n\n{result['note']}. Reproduce: `python bench/scale_out.py`.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
