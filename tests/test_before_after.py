"""The fixed-seed before/after grid (egrpo_backend/jobs/before_after.py): drawn at every held-out evaluation
and announced by an event; a resumed job draws its base row again with the LoRA off, and it is the same
picture as the first run's (same seeds, base model)."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from egrpo_backend.jobs.before_after import grid_columns  # noqa: E402
from egrpo_backend.jobs.run import create_job, read_events, resume_job, run_job  # noqa: E402
from test_jobs import tiny_spec  # noqa: E402


def test_grid_columns_take_one_seed_per_prompt():
    pairs = [("a", 1), ("a", 2), ("b", 1), ("c", 1), ("b", 2)]
    assert grid_columns(pairs) == [0, 2, 3]
    assert grid_columns(pairs, limit=2) == [0, 2]


def test_grid_is_redrawn_at_each_evaluation_and_its_base_row_survives_a_resume(tmp_path):
    spec = {**tiny_spec(iterations=2, evaluate=True, eval_every=1),
            "eval_prompts": ["a handwritten digit one", "a handwritten digit four"], "eval_seeds": [5, 6]}
    job = create_job(spec, tmp_path / "job")
    run_job(job, until=1, progress=False)
    grids = [e for e in read_events(job)[0] if e["type"] == "before_after"]
    assert [g["iteration"] for g in grids] == [0, 1]
    assert grids[-1]["path"] == "before_after.png" and grids[-1]["prompts"] == spec["eval_prompts"]
    assert grids[-1]["seeds"] == [5, 5]  # the first seed of each prompt: one column per prompt
    first = np.asarray(Image.open(job / "before_after.png"))
    resume_job(job, progress=False)
    grids = [e for e in read_events(job)[0] if e["type"] == "before_after"]
    assert [g["iteration"] for g in grids] == [0, 1, 2]
    second = np.asarray(Image.open(job / "before_after.png"))
    assert first.shape == second.shape == (2 * (128 + 16), 2 * (128 + 8), 3)  # 2 rows x 2 columns of 16 px tiles x 8
    half = first.shape[0] // 2
    assert np.array_equal(first[:half], second[:half])  # base row: sampled again with the LoRA off, same picture
    assert not np.array_equal(first[half:], second[half:])  # the LoRA row moved on
