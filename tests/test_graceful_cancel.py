"""A graceful cancel keeps finished work however long an iteration is (docs/comfyui.md, "Cancel").

The child is a REAL `python -m egrpo_backend run` whose policy is slowed (a sleep in every velocity call,
through a sitecustomize.py on the child's PYTHONPATH), so one iteration lasts many times the manager's
kill grace (kill_after, lowered from its 60 s default to stay fast). The grace only bounds how long the child
may take to ANSWER the cancel (cancel_ack); once it has answered, the manager waits for the next safe point
between phases: the job ends "cancelled" with the checkpoint and LoRA of its last finished iteration, and
is never killed.
"""

import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from egrpo_backend.jobs import process as job_process  # noqa: E402
from egrpo_backend.jobs.checkpoint import latest_checkpoint, read_checkpoint  # noqa: E402
from nodes.job_manager import JobManager  # noqa: E402
from test_job_manager import sent, spec, wait_for  # noqa: E402

SLOW_SITE = '''
import time
from egrpo_backend.method import guidance

_call = guidance.GuidedVelocity.__call__

def _slow(self, *args, **kwargs):
    time.sleep({sleep})  # a stand-in for a large model: every velocity call is slow
    return _call(self, *args, **kwargs)

guidance.GuidedVelocity.__call__ = _slow
'''

KILL_AFTER = 0.5  # seconds the child has to answer; an iteration lasts far longer (see SLOW_SITE)


@pytest.fixture
def slow_manager(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SITE.format(sleep=0.3))
    events = []
    m = JobManager(tmp_path / "jobs", tmp_path / "loras", send=lambda name, data: events.append((name, data)),
                   env={"PYTHONPATH": str(site)}, poll_seconds=0.1, kill_after=KILL_AFTER)
    m.sent = events
    yield m
    m.shutdown(kill=True)
    for path in (tmp_path / "jobs").iterdir():
        job_process.signal_owner(path, signal.SIGKILL)


def test_graceful_cancel_during_a_long_iteration_keeps_the_last_finished_one(slow_manager):
    m = slow_manager
    job = m.submit(spec(20, train={"checkpoint_every": 100, "sample_every": 0}), "slow")
    wait_for(lambda: sent(m, job, "metrics"), timeout=120, what="iteration 1")
    m.cancel(job)  # iteration 2 is in flight: its rollout alone takes several kill graces
    wait_for(lambda: any("safe point" in e.get("message", "") for e in sent(m, job, "cancel")), what="the answer")
    m.cancel(job)  # a second click changes nothing: the answer stands, no kill
    wait_for(lambda: m.get(job)["status"] != "running", timeout=120, what="the end of the cancelled job")
    info = m.get(job)
    assert info["status"] == "cancelled", info
    assert "killed" not in info["message"], info  # it stopped itself at a safe point, it was not killed
    assert sent(m, job, "exit")[-1]["returncode"] == 0
    answered = [e for e in sent(m, job, "cancel") if "safe point" in e.get("message", "")]
    assert answered, "the manager never saw the child's answer (cancel_ack)"
    stopped = [e for e in sent(m, job, "cancel") if "stopped between phases" in e.get("message", "")]
    assert stopped and stopped[-1]["iteration"] == info["iteration"], sent(m, job, "cancel")

    done_iterations = max(e["iteration"] for e in sent(m, job, "metrics"))
    assert info["iteration"] == done_iterations >= 1  # the last finished iteration, not one less
    ckpt = latest_checkpoint(m.root / job)
    assert read_checkpoint(ckpt)["trainer"]["iteration"] == done_iterations
    assert Path(info["lora"]).is_file() and f"{ckpt.name}" == f"iter_{done_iterations:06d}"
    assert not (m.root / job / "cancel").exists() and not (m.root / job / "cancel_ack").exists()


def test_force_cancel_stays_immediate(slow_manager):
    """Force kills at once, even while the child would answer: no wait for the safe point."""
    m = slow_manager
    job = m.submit(spec(20, train={"checkpoint_every": 1, "sample_every": 0}), "forced")
    wait_for(lambda: sent(m, job, "checkpoint"), timeout=120, what="a checkpoint")
    m.cancel(job, force=True)
    info = m.get(job)
    assert info["status"] == "cancelled" and "killed on cancel" in info["message"], info
    assert Path(info["lora"]).is_file()


def test_an_iteration_dropped_at_a_safe_point_is_repeated_exactly_on_resume(tmp_path, monkeypatch):
    """A cancel seen after the rollout of iteration 2 drops it (cursor and RNG back to its start); the job
    reads cancelled at 1 and, resumed, ends with the very LoRA a straight run gives."""
    from egrpo_backend.jobs.run import create_job, read_events, read_status, resume_job, run_job
    from egrpo_backend.method.trainer import Trainer
    from test_jobs import assert_same_lora, lora_of, tiny_spec

    straight = create_job(tiny_spec(iterations=3), tmp_path / "straight")
    run_job(straight, progress=False)

    job = create_job(tiny_spec(iterations=3), tmp_path / "job")
    score = Trainer.score

    def cancel_during_iteration_2(self, *args, **kwargs):
        if self.state.iteration == 1:
            (job / "cancel").write_text("now")  # arrives while iteration 2 is being scored
        return score(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "score", cancel_during_iteration_2)
    result = run_job(job, progress=False)
    assert result["status"] == "cancelled" and result["iteration"] == 1
    stopped = [e for e in read_events(job)[0] if e["type"] == "cancel"]
    assert stopped and stopped[0]["iteration"] == 1 and "iteration 2" in stopped[0]["message"]
    assert read_status(job)["lora"] and read_checkpoint(latest_checkpoint(job))["trainer"]["iteration"] == 1
    monkeypatch.setattr(Trainer, "score", score)
    assert resume_job(job, progress=False)["iteration"] == 3
    assert_same_lora(lora_of(straight), lora_of(job))
