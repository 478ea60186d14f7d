"""How LoRA gradients add up over micro-batches and ranks (docs/scale_out.md, "Exactness").

An optimizer step's gradient is a sum over "pieces": backward passes of at most train.micro_batch
update inputs of ONE prompt. A piece is computed bit-identically whatever the world size (its batch
never depends on other prompts, see guidance.GuidedVelocity), so only the ORDER of the sum could
differ between one process and N ranks; float32 sums in another order round differently, and
AdamW's per-element normalisation magnifies that on near-zero elements. Pieces are therefore summed
in float64, across ranks too, and rounded to float32 once: the same gradient at any world size.

Modes:
  single  one process: the float64 sum becomes p.grad.
  ddp     PyTorch DDP (the composable `replicate`) over the LoRA parameters. Pieces before a step's
          last run without gradient sync; the last piece's backward fires DDP's bucketed all-reduce,
          whose comm hook adds this rank's float64 sum of the earlier pieces and reduces in float64.
          For a model that fits one device.
  fsdp    FSDP2 `fully_shard` per transformer block: the frozen base and the LoRA are sharded across
          ranks and gathered block by block, gradients are reduce-scattered in float32 by FSDP. For a
          base that does not fit one device. Equal to one process to float rounding, not bit-exact.

DDP and FSDP are collectives: every rank must run the same number of pieces per step. A rank with
fewer runs zero-weighted pieces (`pad_to`), as DDP's own uneven-input handling would.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..distributed import add_comm_seconds, communicating

MODES = ("single", "ddp", "fsdp")


def wrap_for_data_parallel(model: torch.nn.Module, mode: str, device: torch.device) -> None:
    """Hand the model to PyTorch's data-parallel engine, in place (before the optimizer is built)."""
    if mode == "ddp":
        from torch.distributed._composable.replicate import replicate

        # init_sync off: every rank built the same base and the same seeded LoRA, and broadcasting a
        # multi-GB frozen base (fp8 included) at start would only cost time. Buffers never change.
        replicate(model, device_id=device, broadcast_buffers=False,
                  find_unused_parameters=True, init_sync=False)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in [*transformer_blocks(model), model]:
            fully_shard(unit)
            unit.set_gradient_divide_factor(1.0)  # sum, not average: losses are divided by the GLOBAL count
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one unit each: the items of the model's top-level ModuleLists
    (a DiT's transformer_blocks / single_transformer_blocks); the rest lives in the root unit."""
    return [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]


class GradientSum:
    """The gradient of one optimizer step, summed over pieces (and ranks) as the module docstring says."""

    def __init__(self, params: list[torch.nn.Parameter], model: torch.nn.Module, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown gradient mode {mode!r}; use one of {MODES}")
        self.params, self.model, self.mode = params, model, mode
        self.partial: dict[int, torch.Tensor] = {}  # id(param) -> float64 sum of the pieces so far
        if mode == "ddp":
            model.register_comm_hook(None, self._float64_all_reduce)

    @contextmanager
    def piece(self, last: bool):
        """Around one piece's backward; `last` marks the step's last piece (DDP / FSDP sync on it)."""
        if self.mode != "single":
            self.model.set_requires_gradient_sync(last)
        yield
        if self.mode == "fsdp":
            return  # FSDP accumulates unsharded gradients itself and reduce-scatters on the last piece
        if self.mode == "single" or not last:
            self._take_into_partial()
        if self.mode == "single" and last:
            for p in self.params:
                total = self.partial.pop(id(p), None)
                p.grad = None if total is None else total.to(p.dtype)

    def _take_into_partial(self) -> None:
        for p in self.params:
            if p.grad is not None:
                g = p.grad.double()
                self.partial[id(p)] = g if id(p) not in self.partial else self.partial[id(p)] + g
                p.grad = None

    def _float64_all_reduce(self, _state, bucket):  # no annotations: DDP checks them, and they are strings here
        """DDP comm hook: this rank's float64 total for the bucket's parameters, summed over ranks
        (no division: each rank's loss is already divided by the GLOBAL transition count)."""
        parts = [g.reshape(-1).double() + self.partial.pop(id(p), torch.zeros((), dtype=torch.float64,
                                                                          device=g.device)).reshape(-1)
                 for p, g in zip(bucket.parameters(), bucket.gradients())]
        total = torch.cat(parts)
        dtype = bucket.buffer().dtype
        t0 = time.perf_counter()
        fut = dist.all_reduce(total, async_op=True).get_future()

        def done(f):  # the reduction's latency; DDP overlaps it with the rest of the backward
            add_comm_seconds(time.perf_counter() - t0)
            return f.value()[0].to(dtype)

        return fut.then(done)


def pad_to(count: int) -> int:
    """The piece count every rank runs this step: the largest over ranks, at least 1 (the sync)."""
    if not dist.is_initialized():
        return count
    t = torch.tensor([max(count, 1)], dtype=torch.long)
    with communicating():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
