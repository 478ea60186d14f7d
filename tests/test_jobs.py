"""Job directories on the embedded default model: outputs, exact resume, SIGKILL recovery, cancel."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from egrpo_backend.jobs.checkpoint import latest_checkpoint, read_checkpoint
from egrpo_backend.jobs.run import create_job, read_events, read_status, resume_job, run_job

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(iterations=4, **train):
    return {
        "model": {"source": "default"},
        "prompts": ["a handwritten digit three", "a handwritten digit seven"],
        "rewards": [{"name": "digit_probability"}],
        "algorithm": {"steps": 6, "active": "0-1", "group_size": 3, "clip_range": 0.2},
        "lora": {"rank": 2, "alpha": 2.0},
        "train": {"iterations": iterations, "prompts_per_iteration": 1, "lr": 3e-3, "minibatches": 2,
                  "checkpoint_every": 1, "evaluate": False, "device": "cpu", "threads": 1, **train},
        "output": {"name": "digits", "formats": ["peft", "kohya", "comfy"]},
    }


def lora_of(job_dir, name="digits.safetensors"):
    return load_file(str(Path(job_dir) / "lora" / name))


def assert_same_lora(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_job_outputs_and_events(tmp_path):
    job = create_job(tiny_spec(iterations=2, sample_every=1), tmp_path / "job")
    result = run_job(job, progress=False)
    assert result["status"] == "finished" and result["iteration"] == 2
    for name in ("job.json", "status.json", "events.jsonl", "plan.png", "reward_curve.png", "metrics.json",
                 "lora/digits.safetensors", "lora/digits.kohya.safetensors", "lora/digits.comfy.safetensors",
                 "samples/iter_000002.png"):
        assert (job / name).is_file(), name
    events, _ = read_events(job)
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "done" and types.count("metrics") == 2
    m = next(e for e in events if e["type"] == "metrics")
    for key in ("reward_mean", "reward_std", "adv_mean", "adv_std", "ratio_mean", "clip_frac", "grad_norm", "nfe",
                "seconds", "eta_seconds", "total"):
        assert key in m, key
    assert read_status(job)["status"] == "finished"
    keys = lora_of(job, "digits.kohya.safetensors").keys()
    assert all(k.startswith("lora_unet_") for k in keys)
    assert all(k.startswith("transformer.") for k in lora_of(job).keys())


def test_resume_is_bit_identical(tmp_path):
    straight = create_job(tiny_spec(), tmp_path / "straight")
    run_job(straight, progress=False)
    split = create_job(tiny_spec(), tmp_path / "split")
    assert run_job(split, until=2, progress=False)["status"] == "stopped"
    assert read_status(split)["iteration"] == 2
    assert resume_job(split, progress=False)["iteration"] == 4
    assert_same_lora(lora_of(straight), lora_of(split))
    hist_a = json.loads((straight / "metrics.json").read_text())["train"]
    hist_b = json.loads((split / "metrics.json").read_text())["train"]
    assert [h["reward_mean"] for h in hist_a] == [h["reward_mean"] for h in hist_b]


def test_a_job_saved_under_other_default_targets_resumes_on_its_own_modules(tmp_path):
    """A job whose spec names no LoRA targets resumes on the modules its checkpoint holds: one saved before
    the defaults changed (stood in for by a spec that named two, then lost them) finishes bit-identical to a
    straight run on those two, instead of failing on modules it never had."""
    spec = tiny_spec()
    spec["lora"]["target_modules"] = ["to_q", "to_v"]
    straight = create_job(spec, tmp_path / "straight")
    run_job(straight, progress=False)
    old = create_job(spec, tmp_path / "old")
    assert run_job(old, until=2, progress=False)["status"] == "stopped"
    saved = json.loads((old / "job.json").read_text())
    del saved["lora"]["target_modules"]  # what an older version wrote: the defaults were implied
    (old / "job.json").write_text(json.dumps(saved))
    assert resume_job(old, progress=False)["iteration"] == 4
    assert_same_lora(lora_of(straight), lora_of(old))


def cli_run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "egrpo_backend", *map(str, args), "--quiet"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_sigkill_mid_iteration_resumes_from_last_checkpoint(tmp_path):
    # Every part runs in a fresh `python -m egrpo_backend` process, as a user's would.
    straight = create_job(tiny_spec(iterations=5), tmp_path / "straight")
    assert cli_run("run", straight).returncode == 0
    job = create_job(tiny_spec(iterations=5), tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "egrpo_backend", "run", str(job), "--quiet"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, offset, seen = time.time() + 120, 0, []
    while time.time() < deadline and child.poll() is None:
        events, offset = read_events(job, offset)
        seen += events
        if any(e["type"] == "checkpoint" and e["iteration"] >= 2 for e in seen):
            break
        time.sleep(0.02)
    assert child.poll() is None, "the child finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert read_status(job)["status"] == "running"  # stale: the process died without a word
    ckpt = read_checkpoint(latest_checkpoint(job))["trainer"]["iteration"]
    assert 2 <= ckpt < 5
    out = cli_run("resume", job)
    assert out.returncode == 0 and "after 5 iterations" in out.stdout, out.stderr[-2000:]
    assert_same_lora(lora_of(straight), lora_of(job))


def test_cancel_file_stops_after_the_current_iteration_with_a_usable_lora(tmp_path):
    from egrpo_backend import lora
    from egrpo_backend.default_model.model import load_default_transformer

    job = create_job(tiny_spec(iterations=50), tmp_path / "job")
    (job / "cancel").write_text("now")  # asked before the run starts: it stops before its first iteration
    result = run_job(job, progress=False)
    assert result["status"] == "cancelled" and result["iteration"] == 0
    assert read_status(job)["status"] == "cancelled" and not (job / "cancel").exists()
    # nothing was learned: no LoRA is written or shown (its checkpoint is kept, to resume)
    assert result["lora"] == [] and read_status(job)["lora"] is None and not (job / "lora").exists()
    assert "no LoRA" in read_status(job)["message"]
    # And it resumes from there, to a LoRA that loads cleanly.
    assert resume_job(job, until=2, progress=False)["iteration"] == 2
    lora.load_lora_file(load_default_transformer(), job / "lora" / "digits.comfy.safetensors")


def test_cancel_command_stops_a_running_child(tmp_path):
    job = create_job(tiny_spec(iterations=200), tmp_path / "job")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "egrpo_backend", "run", str(job), "--quiet"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "metrics" for e in read_events(job)[0]):
        time.sleep(0.05)
    subprocess.run([sys.executable, "-m", "egrpo_backend", "cancel", str(job)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    assert child.wait(timeout=120) == 0, child.stderr.read()
    status = read_status(job)
    assert status["status"] == "cancelled" and 1 <= status["iteration"] < 200
    assert Path(status["lora"]).is_file()


def test_failure_is_recorded(tmp_path, monkeypatch):
    from egrpo_backend.rewards import jpeg

    job = create_job({**tiny_spec(iterations=2), "rewards": [{"name": "jpeg_compressibility"}]}, tmp_path / "job")
    monkeypatch.setattr(jpeg, "jpeg_size_kb", lambda images, quality=95: torch.full((images.shape[0],), float("nan")))
    with pytest.raises(FloatingPointError, match="NaN"):
        run_job(job, progress=False)
    status = read_status(job)
    assert status["status"] == "failed" and "NaN" in status["message"]
    assert read_events(job)[0][-1]["type"] == "error"
    assert not (job / "lora").exists()  # nothing half-written


def test_diversity_guard_stops_and_restores_the_last_passing_lora(tmp_path, monkeypatch):
    """The reward-hacking guard: when held-out diversity falls below guard x base, the run stops
    and the LoRA of the last evaluation that passed is the one exported."""
    from egrpo_backend.jobs import evaluation

    diversities = iter([4.0, 3.9, 3.0, 3.0, 3.0])  # base, iteration 1 (passes), iteration 2 (collapse)

    def fake_evaluate(policy, reward, pairs, sigmas, **kw):
        return {"reward_mean": 0.5, "reward_ci": [0.4, 0.6], "diversity": next(diversities), "scores": [0.5]}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    job = create_job(tiny_spec(iterations=5, evaluate=True, eval_every=1, diversity_guard=0.9), tmp_path / "job")
    result = run_job(job, progress=False)
    assert result["status"] == "stopped" and result["iteration"] == 2
    guard = [e for e in read_events(job)[0] if e["type"] == "guard"]
    assert len(guard) == 1 and guard[0]["restored"] == 1 and guard[0]["diversity"] == 3.0
    kept = load_file(str(job / "checkpoints" / "iter_000001" / "lora.safetensors"))
    assert_same_lora(kept, lora_of(job, "digits.comfy.safetensors"))


def test_drift_guard_stops_when_samples_leave_real_data(tmp_path, monkeypatch):
    """The other sign of reward hacking: held-out drift from real data above guard x base stops the
    run and restores the last LoRA that passed; the guard event says which check fired."""
    from egrpo_backend.jobs import evaluation

    drifts = iter([2.0, 2.05, 2.5, 2.5])  # base, iteration 1 (+2.5%: passes), iteration 2 (+25%: drifted)

    def fake_evaluate(policy, reward, pairs, sigmas, **kw):
        assert kw["drift_fn"] is not None  # the embedded default measures drift (nearest real digit)
        return {"reward_mean": 0.5, "reward_ci": [0.4, 0.6], "diversity": 4.0, "drift": next(drifts), "scores": [0.5]}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    job = create_job(tiny_spec(iterations=4, evaluate=True, eval_every=1, diversity_guard=0.9, drift_guard=1.05),
                     tmp_path / "job")
    result = run_job(job, progress=False)
    assert result["status"] == "stopped" and result["iteration"] == 2
    guard = next(e for e in read_events(job)[0] if e["type"] == "guard")
    assert guard["restored"] == 1 and guard["drift"] == 2.5 and "drift 2.500 rose above 1.05 x base" in guard["message"]
