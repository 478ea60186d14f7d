"""Issue 12, defect 9: writes into a job folder never follow a link. A symlinked events.jsonl, cancel,
status.json, process.lock, lora/ or checkpoints/ is refused with an error naming it, and nothing is
written where the link points."""

import shutil

import pytest

from egrpo_backend.jobs import process as job_process
from egrpo_backend.jobs.files import UnsafeJobFile
from egrpo_backend.jobs.run import EventLog, create_job, export_job, request_cancel, run_job, write_status
from test_jobs import tiny_spec


@pytest.fixture
def outside(tmp_path):
    target = tmp_path / "outside.txt"
    target.write_text("untouched")
    return target


@pytest.fixture
def job(tmp_path):
    return create_job(tiny_spec(iterations=2), tmp_path / "job")


def test_a_linked_event_log_is_refused(job, outside):
    (job / "events.jsonl").symlink_to(outside)
    with pytest.raises(UnsafeJobFile, match="events.jsonl is a symbolic link.*remove the link"):
        EventLog(job).emit("start", iteration=0)
    assert outside.read_text() == "untouched"


def test_a_linked_cancel_file_is_refused(job, outside):
    lock, _ = job_process.claim(job)  # the job runs (in this process): a cancel is accepted
    try:
        (job / "cancel").symlink_to(outside)
        with pytest.raises(UnsafeJobFile, match="cancel is a symbolic link"):
            request_cancel(job)
    finally:
        lock.release()
    assert outside.read_text() == "untouched"


def test_linked_status_and_lock_files_are_refused(job, outside):
    (job / "status.json").unlink()
    (job / "status.json").symlink_to(outside)
    with pytest.raises(UnsafeJobFile, match="status.json is a symbolic link"):
        write_status(job, status="running")
    (job / job_process.LOCK_FILE).symlink_to(outside)
    with pytest.raises(UnsafeJobFile, match="process.lock is a symbolic link"):
        job_process.claim(job)
    assert outside.read_text() == "untouched"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    job = create_job(tiny_spec(iterations=2), tmp_path_factory.mktemp("links") / "job")
    run_job(job, until=1, progress=False)
    return job


@pytest.mark.parametrize("folder", ["lora", "checkpoints"])
def test_a_linked_job_folder_is_refused(trained, tmp_path, folder):
    job = shutil.copytree(trained, tmp_path / "job", symlinks=True)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(job / folder, elsewhere)
    (job / folder).symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in elsewhere.rglob("*"))
    with pytest.raises(UnsafeJobFile, match=f"{folder} is a symbolic link"):
        export_job(job, "peft") if folder == "lora" else run_job(job, progress=False)
    assert sorted(p.name for p in elsewhere.rglob("*")) == before
