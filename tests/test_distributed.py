"""Data-parallel helpers: prompt shares keep global slots, the loss scale makes DDP's average equal the
one-process gradient, and gathers / the cancel broadcast work across 2 gloo ranks on CPU."""

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


def test_loss_scale_makes_the_rank_average_the_global_mean():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    shares = [per_sample[:2], per_sample[2:]]  # unequal counts on purpose
    averaged = sum(distributed.loss_scale(len(s), 5, 2) * s.mean() for s in shares) / 2
    assert torch.allclose(averaged, per_sample.mean())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert distributed.init(torch.device("cpu"), 30.0)
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
