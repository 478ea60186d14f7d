"""REST routes under /egrpo/ with aiohttp's test client (no ComfyUI, no child process): every id
and file path is validated; path traversal attempts are rejected with 400 and nothing outside the
jobs folder is served."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from egrpo_backend.jobs.run import EventLog, create_job, write_status  # noqa: E402
from nodes.job_manager import JobManager  # noqa: E402
from nodes.routes import make_app  # noqa: E402

SPEC = {"model": {"source": "default"}, "rewards": [{"name": "jpeg_compressibility"}],
        "algorithm": {"steps": 6, "active": "0-1", "group_size": 2}, "train": {"iterations": 3}}


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "jobs")
    job = create_job(SPEC, m.root / "job-1")
    write_status(job, status="cancelled", iteration=1)
    log = EventLog(job)
    log.emit("start", iteration=0, total=3, resumed=False, plan={"steps": []}, device="cpu")
    log.emit("metrics", iteration=1, total=3, reward_mean=0.25, eta_seconds=2.0)
    (job / "plan.png").write_bytes(b"\x89PNG fake")
    (job / "samples").mkdir()
    (job / "samples" / "iter_000001.png").write_bytes(b"\x89PNG sample")
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    (m.root / "secret.png").write_bytes(b"outside any job")
    return m


async def call(manager, method, path):
    async with TestClient(TestServer(make_app(manager))) as client:
        resp = await client.request(method, path)
        body = await resp.read()
        return resp.status, body


def run(coro):
    import asyncio

    return asyncio.run(coro)


def test_list_get_events_metrics(manager):
    status, body = run(call(manager, "GET", "/egrpo/jobs"))
    assert status == 200 and [j["id"] for j in json.loads(body)["jobs"]] == ["job-1"]
    status, body = run(call(manager, "GET", "/egrpo/jobs/job-1"))
    info = json.loads(body)
    assert status == 200 and info["status"] == "cancelled" and info["resumable"] and info["reward_mean"] == 0.25
    status, body = run(call(manager, "GET", "/egrpo/jobs/job-1/events?offset=0"))
    data = json.loads(body)
    assert [e["type"] for e in data["events"]] == ["start", "metrics"] and data["offset"] > 0
    status, body = run(call(manager, "GET", f"/egrpo/jobs/job-1/events?offset={data['offset']}"))
    assert json.loads(body)["events"] == []
    status, body = run(call(manager, "GET", "/egrpo/jobs/job-1/metrics"))
    assert json.loads(body)["train"][0]["reward_mean"] == 0.25


def test_files_are_served_from_the_job_folder_only(manager):
    assert run(call(manager, "GET", "/egrpo/jobs/job-1/files/plan.png")) == (200, b"\x89PNG fake")
    assert run(call(manager, "GET", "/egrpo/jobs/job-1/files/samples/iter_000001.png"))[0] == 200
    assert run(call(manager, "GET", "/egrpo/jobs/job-1/files/reward_curve.png"))[0] == 404


@pytest.mark.parametrize("path", [
    "/egrpo/jobs/..%2Fsecret.json",
    "/egrpo/jobs/job-1/files/..%2F..%2Fsecret.json",
    "/egrpo/jobs/job-1/files/..%2Fsecret.png",
    "/egrpo/jobs/job-1/files/samples%2F..%2F..%2Fsecret.png",
    "/egrpo/jobs/job-1/files/%2Fetc%2Fpasswd.json",
    "/egrpo/jobs/job-1/files/.hidden.png",
    "/egrpo/jobs/job-1/files/job.py",
    "/egrpo/jobs/.job-1",
    "/egrpo/jobs/job-1/events?offset=abc",
])
def test_path_traversal_and_bad_names_are_rejected(manager, path):
    status, body = run(call(manager, "GET", path))
    assert status in (400, 404), (path, status)
    assert b'{"secret": 1}' not in body and b"outside any job" not in body and b"root:" not in body
    if "%2F" in path or ".hidden" in path or "abc" in path or ".job" in path:
        assert status == 400, (path, status, body)


@pytest.mark.parametrize("method,path", [("POST", "/egrpo/jobs/..%2F..%2Ftmp/cancel"),
                                         ("POST", "/egrpo/jobs/a%2Fb/resume"),
                                         ("DELETE", "/egrpo/jobs/..%2Fjobs")])
def test_writes_reject_bad_ids(manager, method, path):
    assert run(call(manager, method, path))[0] == 400
    assert (manager.root / "job-1" / "job.json").is_file()


def test_state_errors_are_409_and_delete_works(manager):
    assert run(call(manager, "POST", "/egrpo/jobs/job-1/cancel"))[0] == 409  # not running
    assert run(call(manager, "POST", "/egrpo/jobs/nope/cancel"))[0] == 404
    assert run(call(manager, "DELETE", "/egrpo/jobs/job-1"))[0] == 200
    assert not (manager.root / "job-1").exists()


def test_job_status_passes_the_world_size_through(manager):
    """The panel's "N ranks" badge: status.json's world_size (rank 0 writes it); 1 for a one-process job,
    and a job submitted with gpus reports that number while it waits (launch.json)."""
    assert json.loads(run(call(manager, "GET", "/egrpo/jobs/job-1"))[1])["world_size"] == 1
    write_status(manager.root / "job-1", world_size=2)
    assert json.loads(run(call(manager, "GET", "/egrpo/jobs/job-1"))[1])["world_size"] == 2
    assert json.loads(run(call(manager, "GET", "/egrpo/jobs"))[1])["jobs"][0]["world_size"] == 2
    (manager.root / "job-1" / "launch.json").write_text('{"gpus": 4}')
    write_status(manager.root / "job-1", world_size=None)
    info = json.loads(run(call(manager, "GET", "/egrpo/jobs/job-1"))[1])
    assert info["world_size"] == 4 and info["gpus"] == 4
