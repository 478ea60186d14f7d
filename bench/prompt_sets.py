"""Prompt sets at paper scale (docs/prompts.md): a 1-iteration job on the embedded default with a
200,000-prompt file, through the CLI (`python -m egrpo_backend train`), timed end to end; the LoRA
header's size and whether it names any absolute path.

    python bench/prompt_sets.py [--prompts 200000] [--out bench/results/prompt_sets.json]

Each run uses a fresh prompt-index folder (EGRPO_PROMPT_INDEX), so the file is hashed, indexed and
its prompts checked against the model's rule in the timed run (nothing is remembered from before).
The job runs with one torch thread and the report gives CPU seconds beside wall seconds: on a shared
machine the wall time measures the other work as much as this one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ("a handwritten digit {}", "the number {} written by hand", "a sketch of the numeral {}", "digit: {}")
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_prompts(path: Path, n: int) -> None:
    """n distinct prompts, each naming one digit (HPDv2-sized by default: 103,700 is the paper's set)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(TEMPLATES[i % len(TEMPLATES)].format(NAMES[i % 10]) + f", sample {i:07d}\n")


def header(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.dumps(f.metadata())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=200_000)
    p.add_argument("--out", default="")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_prompts(tmp / "prompts.txt", a.prompts)
        spec = {"model": {"source": "default"}, "prompts": {"file": "prompts.txt"},
                "rewards": [{"name": "digit_probability"}],
                "algorithm": {"steps": 6, "active": "0-1", "group_size": 4},
                "lora": {"rank": 4}, "train": {"iterations": 1, "prompts_per_iteration": 2, "device": "cpu", "threads": 1},
                "output": {"name": "bench", "formats": ["peft", "kohya", "comfy"]}}
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "EGRPO_PROMPT_INDEX": str(tmp / "index"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        t0, started_at = time.perf_counter(), time.time()
        run = subprocess.run([sys.executable, "-m", "egrpo_backend", "train", str(tmp / "spec.json"), "--out",
                              str(tmp / "job"), "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        if run.returncode:
            print(run.stdout, run.stderr, file=sys.stderr)
            return run.returncode
        events = [json.loads(line) for line in (tmp / "job" / "events.jsonl").read_text().splitlines()]
        loras = sorted((tmp / "job" / "lora").glob("*.safetensors"))
        headers = {f.name: header(f) for f in loras}
        absolute = {name: re.findall(r'"(/[^"]*)"', h) + re.findall(re.escape(str(tmp)), h) for name, h in headers.items()}
        at = {e["type"]: e["time"] for e in reversed(events)}  # the first event of each type
        first_encode = next(e for e in events if e["type"] == "encode")
        result = {
            "prompts": a.prompts, "seconds_total": round(seconds, 1),
            "cpu_seconds_total": round(cpu.ru_utime + cpu.ru_stime, 1),  # the same work on a shared (loaded) machine
            "load_average_1min": os.getloadavg()[0],
            "seconds_to_start_event": round(at["start"] - started_at, 1),  # index + rule check + model load
            "seconds_start_to_first_encode": round(first_encode["time"] - at["start"], 1),  # held-out eval of the base model
            "seconds_first_encode_to_done": round(at["done"] - first_encode["time"], 1),
            "encode_events": sum(e["type"] == "encode" for e in events),
            "prompts_encoded": max([e["encoded"] for e in events if e["type"] == "encode"], default=0),
            "iteration_seconds": round(next(e["seconds"] for e in events if e["type"] == "metrics"), 2),
            "lora_header_bytes": {name: len(h) for name, h in headers.items()},
            "absolute_paths_in_headers": {name: hits for name, hits in absolute.items() if hits},
            "job_json_bytes": (tmp / "job" / "job.json").stat().st_size,
        }
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
