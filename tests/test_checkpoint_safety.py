"""Damaged or hostile checkpoint files give a clear error (never a traceback, never unpickled code),
a NaN LoRA is refused, and what a crash leaves behind is cleaned up on the next run."""

import contextlib
import io
import os
import pickle
import shutil
import stat
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from egrpo_backend.__main__ import main
from egrpo_backend.jobs.checkpoint import CheckpointError, latest_checkpoint
from egrpo_backend.jobs.run import create_job, export_job, run_job
from test_jobs import tiny_spec


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    job = create_job(tiny_spec(iterations=1), tmp_path_factory.mktemp("done") / "job")
    run_job(job, progress=False)
    return job


@pytest.fixture
def job(finished_job, tmp_path):
    return shutil.copytree(finished_job, tmp_path / "job")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/egrpo_pwned",))


def cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue()


@pytest.mark.parametrize("damage", ["garbage_state", "hostile_pickle", "garbage_lora", "truncated_lora"])
def test_damaged_checkpoints_are_refused_by_export_and_resume(job, damage):
    ckpt = latest_checkpoint(job)
    if damage == "garbage_state":
        (ckpt / "state.pt").write_bytes(os.urandom(256))
    elif damage == "hostile_pickle":
        (ckpt / "state.pt").write_bytes(pickle.dumps({"trainer": Evil(), "runner": {}}))
    elif damage == "garbage_lora":
        (ckpt / "lora.safetensors").write_bytes(b"\x00" * 64)
    else:
        data = (ckpt / "lora.safetensors").read_bytes()
        (ckpt / "lora.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} is unusable.*Delete that folder"):
        export_job(job, "peft")
    for command in (("export", str(job), "--format", "kohya"), ("resume", str(job), "--quiet")):
        rc, message = cli(*command)
        assert rc == 2 and message.startswith("error: checkpoint") and "Traceback" not in message, message
    assert not os.path.exists("/tmp/egrpo_pwned")


def test_a_nan_lora_is_not_exported(job):
    path = latest_checkpoint(job) / "lora.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="NaN/inf values"):
        export_job(job, "peft")


def test_crash_leftovers_are_removed_and_files_get_normal_modes(job):
    ckpts = job / "checkpoints"
    stale_dir = ckpts / ".tmp-iter_000002-999999"
    stale_dir.mkdir()
    (stale_dir / "lora.safetensors").write_bytes(b"half")
    stale_file = job / ".status.json.abc123.tmp"
    stale_file.write_text("{")
    fresh_file = job / "lora" / ".digits.safetensors.live.tmp"  # a write in flight right now: kept
    fresh_file.write_text("x")
    old = time.time() - 3600
    for p in (stale_dir, stale_file):
        os.utime(p, (old, old))
    spec_path = job / "job.json"
    spec_path.write_text(spec_path.read_text().replace('"iterations": 1', '"iterations": 2'))
    run_job(job, progress=False)
    assert not stale_dir.exists() and not stale_file.exists() and fresh_file.exists()
    umask = os.umask(0)
    os.umask(umask)
    for path in (job / "status.json", job / "lora" / "digits.safetensors", latest_checkpoint(job) / "state.pt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
