"""Data-parallel plumbing over torch.distributed: process group set-up from torchrun's environment,
the prompt share of each rank, gathers to rank 0 and the cancel broadcast.

One process (no torchrun) is world size 1 and every helper is then a no-op, so the trainer calls them
unconditionally. A group never spans ranks (each rank rolls out whole prompts), so advantages need no
communication; only gradients (DDP / FSDP2, gradient_sync.py), metrics and the cancel decision cross ranks.
"""

from __future__ import annotations

import datetime
import os
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist


_comm_seconds = [0.0]  # this process's seconds in collectives since the last take_comm_seconds()


@contextmanager
def communicating():
    """Time a blocking collective (waiting for a slower rank counts: it is time the step is not computing)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        add_comm_seconds(time.perf_counter() - t0)


def add_comm_seconds(seconds: float) -> None:
    _comm_seconds[0] += seconds


def take_comm_seconds() -> float:
    """Seconds in collectives since the last call (the trainer reports them per iteration)."""
    seconds, _comm_seconds[0] = _comm_seconds[0], 0.0
    return seconds


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) outside torchrun."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device, timeout_s: float) -> bool:
    """Join torchrun's process group; False (and nothing done) for a single process.

    The timeout bounds every collective, so a dead rank fails the others instead of hanging them."""
    rank, _, world = world_from_env()
    if world <= 1 or dist.is_initialized():
        return dist.is_initialized()
    from torch.distributed.rendezvous import rendezvous

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(rendezvous("env://", rank, world, timeout=timeout))
    # torchrun keeps one key-value store across the restarts of --max-restarts; without a per-attempt prefix
    # a restarted rank can read the dead attempt's peer addresses and the group never connects
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend_for(device), store=dist.PrefixStore(f"egrpo/attempt_{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)
    return True


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: GPU LOCAL_RANK of its machine under torchrun (one process per GPU)."""
    if device.type != "cuda" or world_from_env()[2] <= 1:
        return device
    local = world_from_env()[1]
    if local >= torch.cuda.device_count():
        raise RuntimeError(f"rank with LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                           f"start at most that many processes per node (--nproc-per-node)")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def teardown(together: bool = True) -> None:
    """Leave the group; `together` after a clean end (a failing rank leaves at once: its peers are not
    coming to a barrier). gloo's worker threads release each finished collective's tensors a moment
    after the caller sees it complete; if the interpreter is already shutting down then, the release cannot
    take the GIL and the rank aborts (a finished job reported as a failed rank). So: a barrier (every rank's
    collectives are done) and a short GIL-free pause for those releases before the group goes."""
    if dist.is_initialized():
        try:
            if together:
                dist.barrier()
                time.sleep(0.2)
        finally:
            dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_writer() -> bool:
    """Rank 0 alone writes events, checkpoints, samples and LoRAs."""
    return rank() == 0


def check_divisible(prompts_per_iteration: int, world: int) -> None:
    if prompts_per_iteration % world:
        raise ValueError(
            f"train.prompts_per_iteration = {prompts_per_iteration} is not divisible by the world size {world}; "
            f"set it to a multiple of {world} (every rank rolls out the same number of whole prompts)")


def local_share(items: list, slots: list[int], rank_: int, world: int) -> tuple[list, list[int]]:
    """This rank's contiguous share of the iteration's prompts, keeping their GLOBAL slots,
    so a prompt's rollout noise (seeded by its slot) does not depend on the rank that draws it."""
    check_divisible(len(items), world)
    per = len(items) // world
    lo, hi = rank_ * per, (rank_ + 1) * per
    return items[lo:hi], slots[lo:hi]


def gather_to_writer(obj):
    """Every rank's object as a list on rank 0 (rank order), None on the others; [obj] alone."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if is_writer() else None
    with communicating():
        dist.gather_object(obj, out, dst=0)
    return out


def all_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped per-rank tensors along dim 0 on every rank (rewards, advantages)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    with communicating():
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_decision(flag: bool) -> bool:
    """Rank 0's decision (e.g. 'cancel requested') on every rank, so all stop after the same iteration."""
    if not dist.is_initialized():
        return flag
    box = [bool(flag) if is_writer() else None]
    with communicating():
        dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def all_sum(value: float | int) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    with communicating():
        dist.all_reduce(t)
    return t.item()


def all_objects(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    with communicating():
        dist.all_gather_object(out, obj)
    return out
