"""Data parallel on 2 gloo ranks on CPU (torch.distributed, DDP via `replicate`): prompt shares keep global
slots, gathers and the cancel broadcast work, 2 ranks train exactly what one process trains, and faults
(a killed rank) end the job with an error naming the rank."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from egrpo_backend import distributed
from egrpo_backend.config import SpecError, TrainSpec


def test_single_process_helpers_are_no_ops():
    assert distributed.world_size() == 1 and distributed.is_writer()
    assert distributed.gather_to_writer({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_decision(True) is True
    t = torch.arange(3.0)
    assert distributed.all_concat(t) is t
    assert distributed.init(torch.device("cpu"), 10.0) is False


def test_shares_keep_global_slots_and_cover_the_iteration():
    prompts, slots = ["a", "b", "c", "d"], [8, 9, 10, 11]
    shares = [distributed.local_share(prompts, slots, r, 2) for r in range(2)]
    assert shares == [(["a", "b"], [8, 9]), (["c", "d"], [10, 11])]


def test_indivisible_prompts_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"train.prompts_per_iteration = 3 .*multiple of 2"):
        distributed.check_divisible(3, 2)


def test_spec_rejects_unknown_parallel_mode():
    with pytest.raises(SpecError, match="train.parallel"):
        TrainSpec(parallel="zero3").validate()
    with pytest.raises(SpecError, match="train.dist_timeout"):
        TrainSpec(dist_timeout=0).validate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world: int, port: int, timeout: float = 60.0) -> None:
    """Join a CPU gloo group as `rank` of `world` on this machine, as torchrun would set it up (one
    thread per rank); a single process (world 1) stays outside any group."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        assert distributed.init(torch.device("cpu"), timeout)


def _worker(rank: int, port: int, out: dict) -> None:
    join_gloo(rank, 2, port, 30.0)
    try:
        gathered = distributed.gather_to_writer({"rank": rank})
        cat = distributed.all_concat(torch.tensor([float(rank)]))
        decision = distributed.broadcast_decision(rank == 0)  # only rank 0's view counts
        out[rank] = (gathered, cat.tolist(), decision, distributed.is_writer())
    finally:
        distributed.teardown()


def test_two_gloo_ranks_gather_concat_and_broadcast():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        got = dict(out)
    assert got[0] == ([{"rank": 0}, {"rank": 1}], [0.0, 1.0], True, True)
    assert got[1] == (None, [0.0, 1.0], True, False)
    assert not dist.is_initialized()


# --- the trainer: 2 gloo ranks compute what one process computes ------------------------------------
class Brightness:
    """A smooth reward: JPEG size jumps at quantisation steps, so float-rounding differences between
    one process and 2 ranks (gradient sum order) would show up as different rewards after an update."""

    name = "brightness"

    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))


def _trainer_run(rank: int, world: int, port: int, out: dict, parallel: str = "ddp") -> None:
    from egrpo_backend.lora import LoraSettings, add_lora, lora_tensors
    from egrpo_backend.rewards import WeightedRewards
    from egrpo_backend.method.trainer import Trainer
    from test_trainer import PROMPTS, small_spec
    from tiny_models import make_policy

    join_gloo(rank, world, port)
    try:
        policy = make_policy("sd3")
        add_lora(policy.lora_model(), LoraSettings(rank=4, alpha=4.0), seed=0)
        spec = small_spec()
        spec.train.parallel = parallel
        trainer = Trainer(policy, spec, WeightedRewards([Brightness()], [1.0]), PROMPTS)
        metrics = [trainer.step().metrics for _ in range(3)]
        lora = {k: torch.cat([t.down.flatten(), t.up.flatten()]) for k, t in lora_tensors(policy.lora_model()).items()}
        out[rank] = (metrics, lora)
    finally:
        distributed.teardown()


def _comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("seconds", "phases", "comm_seconds")}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process(parallel):
    """Global prompts_per_iteration 2 over 3 iterations: 1 prompt per rank vs 2 in one process, with
    DDP (replicated LoRA) and with FSDP2 (base and LoRA sharded per transformer block)."""
    with mp.Manager() as manager:
        out = manager.dict()
        _trainer_run(0, 1, 0, out)
        single_metrics, single_lora = out[0]
        mp.spawn(_trainer_run, args=(2, _free_port(), out, parallel), nprocs=2, join=True)
        ranks = [out[0], out[1]]
    for metrics, lora in ranks:
        for a, b in zip(metrics, single_metrics):
            a, b = _comparable(a), _comparable(b)
            assert a.keys() == b.keys()
            for k in ("branch_steps", "nfe", "nfe_update", "optimizer_steps", "trained_transitions", "lr",
                      "reward_mean", "reward_std", "adv_mean", "adv_std", "adv_abs_max"):
                assert a[k] == b[k], k  # exact: same rollouts, same rewards, same advantages
            for k, v in b.items():  # the rest (ratios, losses, norms) to rounding: gathered in another order
                if isinstance(v, float):
                    assert a[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        diffs = [(lora[name] - tensor).abs().max().item() for name, tensor in single_lora.items()]
        # Measured 0.0: prompts are never batched together and gradients are summed in float64
        # (egrpo_backend/method/gradient_sync.py), so the world size does not change a bit.
        assert max(diffs) < 1e-6


# --- faults: SIGKILL of rank 1 ends the job with an error naming it; resume (1 rank) finishes -------------
def _rank_pid(job_dir, rank: int) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"EGRPO_LOCK_HELD=1" in env and str(job_dir).encode() in cmdline:
            return int(entry)
    return None


def test_sigkill_of_rank_1_fails_the_job_naming_it_then_resume_finishes(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_jobs import tiny_spec
    from egrpo_backend.config import JobSpec
    from egrpo_backend.jobs.run import create_job, read_events, read_status

    job = tmp_path / "job"
    create_job(JobSpec.from_dict(tiny_spec(40, prompts_per_iteration=2)), job)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    parent = subprocess.Popen([sys.executable, "-m", "egrpo_backend", "run", str(job), "--nproc-per-node", "2", "--quiet"],
                              env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while not any(e["type"] == "checkpoint" for e in read_events(job)[0]) and time.time() < deadline:
            time.sleep(0.5)
        os.kill(_rank_pid(job, 1), signal.SIGKILL)
        killed = time.time()
        parent.wait(timeout=60)
        assert time.time() - killed < 60
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)  # the parent, torchrun and the ranks
    errors = [e for e in read_events(job)[0] if e["type"] == "error"]
    assert errors and "rank 1" in errors[-1]["message"], errors
    assert read_status(job)["status"] == "failed"
    done = subprocess.run([sys.executable, "-m", "egrpo_backend", "resume", str(job), "--until", "3", "--quiet"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((job / "status.json").read_text())["iteration"] >= 3


# --- resume across world sizes: a checkpoint of 2 ranks continues on 1 (and the reverse) exactly ------------
def _cli(args: list[str], job) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "egrpo_backend", *args, str(job), "--quiet"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _ranks(n: int) -> list[str]:
    return ["--nproc-per-node", str(n)] if n > 1 else []


@pytest.fixture(scope="module")
def straight_one_rank_lora(tmp_path_factory):
    from test_jobs import lora_of, tiny_spec
    from egrpo_backend.config import JobSpec
    from egrpo_backend.jobs.run import create_job

    job = tmp_path_factory.mktemp("straight") / "job"
    create_job(JobSpec.from_dict(tiny_spec(3, prompts_per_iteration=2)), job)
    _cli(["run"], job)
    return lora_of(job)


@pytest.mark.parametrize("first,then,parallel", [(2, 1, "ddp"), (1, 2, "ddp"), (2, 1, "fsdp"), (1, 2, "fsdp")])
def test_checkpoint_resumes_on_another_world_size_exactly(tmp_path, straight_one_rank_lora, first, then, parallel):
    """2 iterations on `first` ranks, the 3rd resumed from the checkpoint on `then` ranks, equals 3
    iterations in one process (LoRA within 1e-6; measured bit-equal)."""
    from test_jobs import lora_of, tiny_spec
    from egrpo_backend.config import JobSpec
    from egrpo_backend.jobs.run import create_job, read_status

    job = tmp_path / "job"
    create_job(JobSpec.from_dict(tiny_spec(3, prompts_per_iteration=2, parallel=parallel)), job)
    _cli(["run", "--until", "2", *_ranks(first)], job)
    assert read_status(job)["iteration"] == 2 and read_status(job)["world_size"] == first
    _cli(["resume", *_ranks(then)], job)
    assert read_status(job)["status"] == "finished" and read_status(job)["world_size"] == then
    got = lora_of(job)
    assert got.keys() == straight_one_rank_lora.keys()
    assert max((got[k] - straight_one_rank_lora[k]).abs().max().item() for k in got) < 1e-6


def test_max_restarts_restarts_the_ranks_and_resumes_without_help(tmp_path):
    """torchrun --max-restarts 1: rank 1 killed after the first checkpoint; torchrun restarts every rank,
    they resume from the last checkpoint by themselves and the job finishes."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_jobs import tiny_spec
    from egrpo_backend.config import JobSpec
    from egrpo_backend.jobs.run import create_job, read_events, read_status

    job = tmp_path / "job"
    create_job(JobSpec.from_dict(tiny_spec(8, prompts_per_iteration=2)), job)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    parent = subprocess.Popen([sys.executable, "-m", "egrpo_backend", "run", str(job), "--nproc-per-node", "2",
                               "--max-restarts", "1", "--quiet"], env=env, cwd=root, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not any(e["type"] == "checkpoint" for e in read_events(job)[0]) and time.time() < deadline:
            time.sleep(0.2)
        os.kill(_rank_pid(job, 1), signal.SIGKILL)
        _, err = parent.communicate(timeout=240)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    assert parent.returncode == 0, err[-3000:]
    starts = [e for e in read_events(job)[0] if e["type"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["iteration"] >= 1
    assert read_status(job)["status"] == "finished" and read_status(job)["iteration"] == 8


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    """One process per GPU: rank LOCAL_RANK uses cuda:LOCAL_RANK; a machine short of GPUs is named."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.rank_device(cpu) == cpu
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 1 has no GPU.*--nproc-per-node"):
        distributed.rank_device(torch.device("cuda"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda")
