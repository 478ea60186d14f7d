"""Issue 12, defects 3 and 4: a damaged job folder shows as "damaged" without hiding the others, and a
job saved as running whose process is gone (no one holds its lock) reads as "failed: process ended"
in the CLI's `status`, the routes and hence the panel."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import comfy_fakes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from egrpo_backend.jobs.run import create_job, write_status  # noqa: E402
from nodes.job_manager import JobManager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPEC = comfy_fakes.TINY_JOB


def get(manager, path):
    status, body = comfy_fakes.route_get(manager, path)
    return status, json.loads(body)


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "jobs")
    write_status(create_job(SPEC, m.root / "good"), status="cancelled", iteration=1)
    return m


@pytest.mark.parametrize("content", ["[]", '{"total": "abc"}', '{"status": "running", "iteration": -1}', "{nope"])
def test_a_damaged_status_shows_the_job_damaged_and_the_others_as_they_are(manager, content):
    (create_job(SPEC, manager.root / "bad") / "status.json").write_text(content)
    status, body = get(manager, "/egrpo/jobs")
    assert status == 200, body
    jobs = {j["id"]: j for j in body["jobs"]}
    assert jobs["good"]["status"] == "cancelled"
    assert jobs["bad"]["status"] == "damaged" and "status.json" in jobs["bad"]["message"]
    assert get(manager, "/egrpo/jobs/bad") == (200, jobs["bad"])


def test_a_dangling_link_in_the_jobs_folder_shows_damaged(manager, tmp_path):
    (manager.root / "gone").symlink_to(tmp_path / "nowhere")
    status, body = get(manager, "/egrpo/jobs")
    assert status == 200, body
    jobs = {j["id"]: j for j in body["jobs"]}
    assert jobs["good"]["status"] == "cancelled"
    assert jobs["gone"]["status"] == "damaged" and "link" in jobs["gone"]["message"]


def _dead_running_job(manager):
    job = create_job(SPEC, manager.root / "dead")
    write_status(job, status="running", pid=99999999, iteration=1)  # no process holds its lock
    return job


def test_a_running_job_without_a_process_reads_failed_in_the_routes(manager):
    _dead_running_job(manager)
    status, body = get(manager, "/egrpo/jobs/dead")
    assert status == 200 and body["status"] == "failed" and body["message"].startswith("process ended")
    assert body["resumable"]


def test_a_running_job_without_a_process_reads_failed_in_the_cli(manager):
    job = _dead_running_job(manager)
    out = subprocess.run([sys.executable, "-m", "egrpo_backend", "status", str(job)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["status"] == "failed" and status["message"].startswith("process ended")


def test_start_up_scan_survives_a_job_whose_status_cannot_be_written(manager, tmp_path):
    """A linked status.json saying running: the scan refuses to write through the link, goes on, and
    the job still reads failed (process ended)."""
    job = create_job(SPEC, manager.root / "linked")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"status": "running", "iteration": 1, "total": 3}))
    (job / "status.json").unlink()
    (job / "status.json").symlink_to(outside)
    assert "linked" in manager.scan()
    assert json.loads(outside.read_text())["status"] == "running"  # nothing written through the link
    assert get(manager, "/egrpo/jobs/linked")[1]["status"] == "failed"
