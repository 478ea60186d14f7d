"""Issue 12, defect 3: a full disk. Simulated by making the write raise OSError(ENOSPC) (a tmpfs would
need root and a mount; the code paths are the same). Event lines are whole or absent, a torn last line
is cut before the next append, the error names the folder and the bytes needed, the CLI prints it
without a traceback, the previous checkpoint survives, and the status reads failed in any case."""

import contextlib
import errno
import io
import json
import os
import shutil

import pytest

from egrpo_backend.jobs import files as job_files
from egrpo_backend.jobs import run as jobs_module
from egrpo_backend.__main__ import main
from egrpo_backend.jobs.checkpoint import latest_checkpoint, read_checkpoint
from egrpo_backend.jobs.files import DiskFull
from egrpo_backend.jobs.run import EventLog, create_job, read_events, read_status, run_job
from test_jobs import tiny_spec


def full_disk_write(fd, data):
    os.write(fd, data[: len(data) // 2])  # what a filling disk takes before it refuses the rest
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_event_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    log = EventLog(tmp_path)
    log.emit("start", iteration=0)
    before = (tmp_path / "events.jsonl").read_bytes()
    monkeypatch.setattr(job_files, "_os_write", full_disk_write)
    with pytest.raises(DiskFull) as e:
        log.emit("metrics", iteration=1, reward_mean=0.5)
    assert str(tmp_path) in str(e.value) and "bytes" in str(e.value) and e.value.needed > 0
    assert (tmp_path / "events.jsonl").read_bytes() == before


def test_a_torn_last_line_is_cut_before_the_next_event(tmp_path):
    EventLog(tmp_path).emit("start", iteration=0)
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"type": "metrics", "itera')  # a crash in the middle of an old-style write
    EventLog(tmp_path).emit("done", status="finished")
    events, offset = read_events(tmp_path)
    assert [e["type"] for e in events] == ["start", "done"]
    assert offset == (tmp_path / "events.jsonl").stat().st_size


@pytest.fixture(scope="module")
def stopped_job(tmp_path_factory):
    job = create_job(tiny_spec(iterations=3), tmp_path_factory.mktemp("full") / "job")
    run_job(job, until=1, progress=False)
    return job


@pytest.fixture
def job(stopped_job, tmp_path):
    return shutil.copytree(stopped_job, tmp_path / "job")


def cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue()


def test_a_full_disk_at_a_checkpoint_is_a_clear_error_and_the_last_checkpoint_survives(job, monkeypatch):
    previous = latest_checkpoint(job)

    def no_space(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("egrpo_backend.jobs.checkpoint.torch.save", no_space)
    rc, err = cli("resume", str(job), "--quiet")
    assert rc == 2 and "Traceback" not in err, err
    assert "disk full" in err and str(job / "checkpoints") in err and "bytes" in err, err
    assert latest_checkpoint(job) == previous and read_checkpoint(previous)["trainer"]["iteration"] == 1
    status = read_status(job)
    assert status["status"] == "failed" and "disk full" in status["message"]


def test_when_even_the_failed_status_cannot_be_written_it_reads_failed(job, monkeypatch):
    real_write_status = jobs_module.write_status

    def write_status(job_dir, **fields):
        if fields.get("status") == "failed":
            raise DiskFull(job_dir, 512, "status.json")
        return real_write_status(job_dir, **fields)

    monkeypatch.setattr(jobs_module, "write_status", write_status)
    monkeypatch.setattr(job_files, "_os_write", full_disk_write)
    rc, err = cli("resume", str(job), "--quiet")
    assert rc == 2 and "Traceback" not in err and "disk full" in err, err
    assert read_status(job)["status"] == "running"  # the last word the disk took
    from egrpo_backend.jobs.folder import current_status

    assert current_status(job)["status"] == "failed" and current_status(job)["message"].startswith("process ended")
    assert all(line.endswith(b"}") for line in (job / "events.jsonl").read_bytes().splitlines())
    json.loads((job / "events.jsonl").read_bytes().splitlines()[-1])
    assert read_checkpoint(latest_checkpoint(job))["trainer"]["iteration"] == 1
