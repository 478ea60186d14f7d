"""Issue 25: every bad spec refused before a job exists, no job that can never checkpoint, a full disk
named at every fill level, status.json made true by the next command, resume of a finished job
leaving its LoRA bytes alone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import comfy_fakes

comfy_fakes.install()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from egrpo_backend import job_process  # noqa: E402
from egrpo_backend.config import JobSpec, SpecError  # noqa: E402
from egrpo_backend.job_folder import PROCESS_ENDED, read_status, write_status  # noqa: E402
from egrpo_backend.jobs import create_job, run_job  # noqa: E402
from nodes import train_nodes  # noqa: E402
from test_graph_files import KW  # noqa: E402
from test_jobs import tiny_spec  # noqa: E402
from test_spec_fuzz import run_cli  # noqa: E402


def refused(tmp_path, spec: dict, key: str) -> str:
    """`train` refuses the spec with rc 2, one line naming `key`, and no job folder."""
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    job = tmp_path / "job"
    rc, err = run_cli(["train", str(tmp_path / "spec.json"), "--out", str(job), "--quiet"])
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert key in err, err
    assert not job.exists(), err
    return err


def test_a_35000_character_negative_prompt_is_refused_before_a_folder_exists(tmp_path):
    spec = tiny_spec()
    spec["algorithm"]["negative_prompt"] = "blurry, " * 4375
    err = refused(tmp_path, spec, "algorithm.negative_prompt")
    assert "35000 characters" in err


def test_a_spec_whose_lora_header_would_be_too_large_is_refused_up_front(tmp_path):
    """9,000 non-ASCII characters: within the character limit, but 54 KB as JSON in each LoRA header."""
    spec = tiny_spec()
    spec["algorithm"]["negative_prompt"] = "\u00e9" * 9000
    err = refused(tmp_path, spec, "algorithm.negative_prompt")
    assert "limit 32768" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: 'cuda' is a valid device here")
def test_cuda_without_cuda_is_refused_before_the_folder(tmp_path):
    refused(tmp_path, tiny_spec(device="cuda"), "train.device")


def test_device_paths_text_and_copy_to_are_checked_before_the_folder(tmp_path):
    refused(tmp_path, tiny_spec(device="cuda:\u0663"), "train.device")
    missing = {**tiny_spec(), "model": {"source": "diffusers", "path": str(tmp_path / "no_model")},
               "rewards": [{"name": "jpeg_compressibility"}]}
    refused(tmp_path, missing, "model.path")
    refused(tmp_path, {**tiny_spec(), "prompts": ["a handwritten digit \ud800three"]}, "prompts[0]")
    refused(tmp_path, {**tiny_spec(), "output": {"name": "digits", "copy_to": "/dev/null"}}, "output.copy_to")
    refused(tmp_path, {**tiny_spec(), "output": {"name": "digits", "copy_to": str(tmp_path) + "/a\x00b"}}, "output.copy_to")
    refused(tmp_path, {**tiny_spec(), "output": {"name": "digits\n"}}, "output.name")


def test_100000_prompts_naming_no_digit_are_refused_before_any_is_encoded(tmp_path, monkeypatch):
    def no_encoding(*a, **k):
        raise AssertionError("prompts were encoded before the prompt rule ran")

    monkeypatch.setattr("egrpo_backend.default_model.text.MiniLMTextEncoder.encode", no_encoding)
    spec = {**tiny_spec(), "prompts": [f"digit {62351 + i}" for i in range(100_000)]}
    err = refused(tmp_path, spec, "prompts: prompt 'digit 62351' names no digit")


def test_nonsense_is_refused_with_the_key_and_a_range_never_clamped():
    cases = [({"rewards": [{"name": "digit_probability", "weight": 0}]}, "every reward weight is 0"),
             ({"algorithm": {"branches_per_prompt": 10**9}}, "algorithm.branches_per_prompt = 1000000000 is out of range; it must be >= 1 and <= 1000"),
             ({"algorithm": {"branch": "random", "active": "0-3", "branches_per_prompt": 5}}, "<= 4 (the number of active steps"),
             ({"train": {"minibatches": 65536}}, "train.minibatches = 65536 is out of range; it must be >= 1 and <= "),
             ({"train": {"seed": 10**400}}, "train.seed = a 401-digit integer is out of range"),
             ({"train": {"lr": 10**400}}, "train.lr = a 401-digit integer"),
             ({"algorithm": {"active": "0-99999999999"}}, "algorithm.active = '0-99999999999' is not allowed")]
    for over, needle in cases:
        spec = tiny_spec()
        for section, values in over.items():
            spec[section] = {**spec[section], **values} if isinstance(spec.get(section), dict) else values
        with pytest.raises(SpecError) as e:
            JobSpec.from_dict(spec)
        assert needle in str(e.value), (over, str(e.value))


def test_a_5000_digit_number_in_a_spec_file_names_its_key(tmp_path):
    text = json.dumps(tiny_spec()).replace('"iterations": 4', '"iterations": ' + "9" * 5000)
    (tmp_path / "spec.json").write_text(text)
    rc, err = run_cli(["train", str(tmp_path / "spec.json"), "--out", str(tmp_path / "job"), "--quiet"])
    assert rc == 2 and "train.iterations" in err and not (tmp_path / "job").exists(), err


def test_base_dir_is_not_a_spec_key_from_a_file_or_a_graph(tmp_path):
    (tmp_path / "hostname").write_text("secret-host-name\n")
    spec = {"base_dir": str(tmp_path), "prompts": {"file": "hostname"}}
    err = refused(tmp_path, spec, "unknown key 'base_dir'")
    assert "secret-host-name" not in err
    graph = train_nodes.build_spec(**KW, overrides=json.dumps({"base_dir": str(tmp_path)}), input_dir=tmp_path)
    with pytest.raises(SpecError, match="unknown key 'base_dir'"):
        JobSpec.from_dict(graph)


def test_a_binary_prompt_file_names_the_key(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    refused(tmp_path, {**tiny_spec(), "prompts": {"file": "prompts.txt"}}, "prompts.file")


# --- status.json made true by the next command -------------------------------------------------------
def test_after_a_sigkill_status_and_cancel_make_status_json_true(tmp_path):
    job = create_job(tiny_spec(iterations=1), tmp_path / "job")
    holder = textwrap.dedent(f"""
        import sys, time
        from egrpo_backend import job_process
        from egrpo_backend.job_folder import write_status
        job_process.claim({str(job)!r})
        write_status({str(job)!r}, status="running", pid=None)
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.stdout.readline().strip() == "ready"
    assert job_process.job_running(job)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_status(job)["status"] == "running"  # what the killed run left on disk
    rc, err = run_cli(["cancel", str(job)])
    assert rc == 2 and "its status is 'failed'" in err, err
    on_disk = read_status(job)
    assert on_disk["status"] == "failed" and on_disk["message"] == PROCESS_ENDED
    write_status(job, status="running", pid=None)  # once more, for `status`
    rc, _ = run_cli(["status", str(job)])
    assert rc == 0 and read_status(job)["status"] == "failed"


def test_a_failed_status_is_written_in_place_when_no_temp_file_fits(tmp_path, monkeypatch):
    from egrpo_backend import job_folder
    from egrpo_backend.job_files import DiskFull

    write_status(tmp_path, status="running", iteration=3)

    def full(path, obj):
        raise DiskFull(Path(path).parent, 600, Path(path).name)

    monkeypatch.setattr(job_folder, "atomic_write_json", full)
    write_status(tmp_path, status="failed", message="disk full: writing x in y needs 1 bytes")
    assert read_status(tmp_path)["status"] == "failed" and read_status(tmp_path)["iteration"] == 3


# --- resume of a finished job -----------------------------------------------------------------------
def test_resume_of_a_finished_job_keeps_its_lora_bytes(tmp_path):
    job = create_job(tiny_spec(iterations=1), tmp_path / "job")
    run_job(job, progress=False)
    before = {p.name: p.read_bytes() for p in (job / "lora").iterdir()}
    rc, err = run_cli(["resume", str(job), "--quiet"])
    assert rc == 0, err
    assert {p.name: p.read_bytes() for p in (job / "lora").iterdir()} == before
    assert read_status(job)["status"] == "finished"


# --- a real full disk at several fill levels -----------------------------------------------------------
@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A 2 MiB tmpfs (root only); skipped with the reason where it cannot be mounted."""
    where = tmp_path_factory.mktemp("disk")
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root; tests/test_disk_full.py simulates a full disk instead")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); tests/test_disk_full.py simulates a full disk")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("level", [0, 20_000, 100_000, 300_000])  # the lock; plan.png; checkpoint 1; checkpoint 2
def test_a_full_disk_at_each_fill_level_is_named_and_recorded(small_disk, tmp_path_factory, level):
    src = tmp_path_factory.getbasetemp() / "full_disk_source"
    if not (src / "job.json").exists():
        create_job(tiny_spec(iterations=2), src)
    for p in small_disk.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    job = Path(shutil.copytree(src, small_disk / "job"))
    with open(small_disk / "ballast", "wb") as f:  # leave `level` bytes free
        os.posix_fallocate(f.fileno(), 0, max(1, _free(small_disk) - level))
    rc, err = run_cli(["run", str(job), "--quiet"])
    line = err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith("error: disk full: writing ") and "Traceback" not in err, err
    assert f" in {job}" in line and " bytes (" in line and "are free there" in line, line
    status = read_status(job)
    assert status["status"] == "failed" and status["message"].startswith("disk full: "), status
