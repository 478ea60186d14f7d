"""What the panel reads of a job (nodes/job_view.py): ETA as a range while iteration times vary, one number
once they are steady; who the job is; its curves with components and the latest before/after grid."""

import sys
from pathlib import Path

import comfy_fakes

comfy_fakes.install()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nodes import job_view  # noqa: E402


def run(gaps, start=100.0, first=5.0):
    events, t = [{"type": "start", "time": start}], start + first
    events.append({"type": "metrics", "time": t, "iteration": 1})
    for i, g in enumerate(gaps, 2):
        t += g
        events.append({"type": "metrics", "time": t, "iteration": i})
    return events


def test_eta_is_a_range_while_unstable_and_one_number_when_steady():
    # the case: fast first iterations, then slow ones (evaluations): never "9 s left" for 82 s of work
    shaky = job_view.eta(run([1, 1, 8, 1, 9]), remaining=22)
    assert not shaky["eta_stable"] and shaky["eta_low"] < shaky["eta_seconds"] < shaky["eta_high"]
    assert shaky["eta_high"] >= 82
    steady = job_view.eta(run([2.0, 2.1, 1.9, 2.0, 2.0]), remaining=10)
    assert steady["eta_stable"] and steady["eta_low"] == steady["eta_high"] == steady["eta_seconds"]
    assert abs(steady["eta_seconds"] - 20) < 0.5
    one = job_view.eta(run([]), remaining=10)  # one iteration known (it includes loading): a wide range
    assert not one["eta_stable"] and one["eta_low"] == 0 and one["eta_high"] == 100
    assert job_view.eta([{"type": "start", "time": 1.0}], remaining=5)["eta_seconds"] is None


def test_eta_counts_only_the_current_run():
    before = run([50, 50, 50])  # a slow first run, then a resume whose iterations take 2 s
    events = before + run([2, 2, 2, 2, 2], start=10_000)
    assert abs(job_view.eta(events, remaining=5)["eta_seconds"] - 10) < 1e-6


def test_identity_and_curves():
    spec = {"output": {"name": "fox"}, "model": {"source": "comfy", "family": "auto"}, "algorithm": {"preset": "dance"}}
    events = [{"type": "start", "time": 7.0, "family": "flux", "plan": {"steps": []}},
              {"type": "metrics", "iteration": 1, "reward_mean": 0.1, "clip_frac": 0.0, "reward/a": 1.0, "reward/b": 2.0,
               "phases": {"rollout": {"seconds": 1.0, "peak_mem_gb": None}}},
              {"type": "eval", "iteration": 1, "reward_mean": 0.2, "reward_ci": [0.1, 0.3]},
              {"type": "before_after", "iteration": 1, "path": "before_after.png", "prompts": ["p"], "seeds": [3], "time": 8.0},
              {"type": "start", "time": 9.0, "family": "flux"},
              {"type": "metrics", "iteration": 1, "reward_mean": 0.15}]  # a resumed run repeats iteration 1
    who = job_view.identity("fox-0123456789ab", spec, events)
    assert who == {"short_id": "01234567", "family": "flux", "preset": "dance", "started": 7.0}
    assert job_view.identity("x-1", {"model": {}}, [])["family"] == "digits (embedded)"
    c = job_view.curves(events)
    assert [t["reward_mean"] for t in c["train"]] == [0.15]
    assert c["components"] == [] and c["eval"][0]["reward_ci"] == [0.1, 0.3]
    assert c["before_after"]["path"] == "before_after.png" and c["plan"] == {"steps": []}
    assert job_view.curves(events[:2])["components"] == ["a", "b"]
