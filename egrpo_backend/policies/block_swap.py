"""Block swap: the frozen base's last N transformer blocks live in host memory and stream to the device
one block ahead of use (`model.offload_blocks`, docs/memory.md "Block swap").

What moves: the base parameters of the swapped blocks (fp8 storage stays fp8: a block moves in its
storage bytes). What never moves: the LoRA (peft adds it later, on the base layer's device, which is
the host for a swapped block; `adopt_new_parameters` puts it on the device for good, and every load
does it again in case a LoRA was injected since), buffers, and everything outside the swapped blocks.

How a block runs (the wrapper `_run`, installed as the block's `forward`):
  1. its host->device copy was requested earlier (when the block before it ran) or is requested now;
  2. the compute stream waits for that copy's event, the parameters point at the device copies;
  3. the copy of the *next* block is requested (forward order; reverse order inside backward, where
     gradient checkpointing recomputes blocks last to first), so it overlaps this block's compute;
  4. the block runs; afterwards (`finally`: checkpointing's early stop ends a recompute by raising)
     the parameters point at the host copies again and the device copies are dropped.
Autograd keeps the device tensors it saved (it saves a parameter's storage, not the parameter), so
backward is exact; that is also why the update needs gradient checkpointing with swap: without it the
graph would keep every swapped block's device copy until backward.

The move rule (tested): a swapped block is copied to the device exactly once per run of its forward:
once per forward pass, and once more per recompute under gradient checkpointing. On CUDA copies run on
their own stream from pinned host memory, with events; elsewhere a no-op stream runs the same code
synchronously (so the CPU tests exercise the whole path). Correctness never depends on the prefetch
guess: a block whose copy was not requested is copied when it runs.

The blocks are the model's direct ModuleList children (diffusers: transformer_blocks /
single_transformer_blocks / blocks / layers; ComfyUI: diffusion_model.double_blocks / single_blocks),
in the order the model defines them, which is the order every supported family runs them.
The blocks' `forward` is wrapped, so `place` must run before anything else wraps it
(comfy_policy's checkpointing does, and must capture ours so its recompute loads the weights).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter

import torch

log = logging.getLogger(__name__)
GIB = 2**30
AUTO_RESERVE_BYTES = 6 * GIB  # "auto" leaves this free for activations, the decode and the reward (docs/memory.md)
PREFETCH_DEPTH = 2  # swapped blocks on the device at once: the running one and the next (+1 in backward, see docs)


def _adapter_name(name: str) -> bool:
    from .weight_storage import _adapter_patterns

    return any(re.search(p, name) for p in _adapter_patterns())


def _blocks_root(model: torch.nn.Module) -> torch.nn.Module:
    root = getattr(model, "diffusion_model", None)
    return root if isinstance(root, torch.nn.Module) else model


def adopt_lora(model: torch.nn.Module) -> None:
    """After a LoRA is injected into `model` (the policy's lora_model()): its parameters in swapped blocks,
    which peft made on the host beside their base layer, move to the device now, before an optimizer or a
    data-parallel wrapper sees them. A no-op without block swap."""
    swap = getattr(model, "_block_swap", None)
    if swap is not None:
        swap.adopt_new_parameters()


def swappable_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every block in run order: the ModuleList children of the model (of
    `model.diffusion_model` for a ComfyUI BaseModel)."""
    root = _blocks_root(model)
    return [(f"{list_name}.{i}", block) for list_name, child in root.named_children()
            if isinstance(child, torch.nn.ModuleList) for i, block in enumerate(child)]


def base_bytes(block: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in block.named_parameters() if not _adapter_name(n))


def auto_offload_blocks(block_bytes: list[int], other_bytes: int, free_bytes: int,
                        reserve_bytes: int = AUTO_RESERVE_BYTES) -> int:
    """The fewest last blocks to keep on the host so that the resident weights, the prefetch buffers
    and `reserve_bytes` fit in `free_bytes`. block_bytes: each block's bytes in run order; other_bytes:
    everything else the device holds (embedders, LoRA, VAE). Raises when even every block swapped does not fit."""
    total = len(block_bytes)
    for n in range(total + 1):
        resident = other_bytes + sum(block_bytes[: total - n])
        buffers = PREFETCH_DEPTH * max(block_bytes[total - n:], default=0) if n else 0
        if resident + buffers + reserve_bytes <= free_bytes:
            return n
    raise ValueError(f"model.offload_blocks 'auto': even with all {total} blocks on the host, the rest needs "
                     f"{(other_bytes + PREFETCH_DEPTH * max(block_bytes, default=0)) / GIB:.1f} GiB + "
                     f"{reserve_bytes / GIB:.1f} GiB for activations, but the device has {free_bytes / GIB:.1f} GiB free; "
                     "use a smaller resolution or batch, fp8 weights (model.weight_dtype), or a larger card")


def resolve_offload_blocks(value, blocks: list[tuple[str, torch.nn.Module]], other_bytes: int,
                           device: torch.device, on_device_bytes: int = 0) -> int:
    """An int N, or "auto" resolved from the device's free memory (0 off CUDA: host memory is device memory).
    on_device_bytes: the model's bytes already on the device (they count as free: the model is being placed)."""
    if value == "auto":
        if device.type != "cuda":
            return 0
        free, _ = torch.cuda.mem_get_info(device)
        return auto_offload_blocks([base_bytes(b) for _, b in blocks], other_bytes, free + on_device_bytes)
    n = int(value)
    if not 0 <= n <= len(blocks):
        raise ValueError(f"model.offload_blocks = {n}, but this model has {len(blocks)} blocks "
                         f"({', '.join(sorted({name.rsplit('.', 1)[0] for name, _ in blocks}))}); use 0..{len(blocks)} or 'auto'")
    return n


class _HostStream:
    """The CPU's stand-in for a CUDA copy stream: copies are synchronous, events are None."""

    def context(self):
        return contextlib.nullcontext()

    def record_event(self):
        return None

    def wait(self, event) -> None:
        pass

    def keep_alive(self, tensor: torch.Tensor) -> None:
        pass


class _CudaStream:
    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.device = device

    def context(self):
        return torch.cuda.stream(self.stream)

    def record_event(self):
        return self.stream.record_event()

    def wait(self, event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def keep_alive(self, tensor: torch.Tensor) -> None:
        tensor.record_stream(torch.cuda.current_stream(self.device))  # made on the copy stream, used on compute


class BlockSwap:
    """The swapped blocks of one model (see the module docstring). `moves` counts host->device copies per
    block name; `trace`, when a list, records ("request", name) and ("run", name) in order (tests)."""

    def __init__(self, blocks: list[tuple[str, torch.nn.Module]], device: torch.device):
        self.device = device
        self.names = [name for name, _ in blocks]
        self.blocks = dict(blocks)
        pin = device.type == "cuda" and torch.cuda.is_available()
        self.stream = _CudaStream(device) if device.type == "cuda" else _HostStream()
        self.host: dict[str, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        for name, block in blocks:
            pairs = []
            for pname, p in block.named_parameters():
                if _adapter_name(pname):
                    continue
                host = p.data.to("cpu")
                host = host.pin_memory() if pin else host
                p.data = host
                pairs.append((p, host))
            self.host[name] = pairs
        self.owned = {name: {id(p) for p, _ in pairs} for name, pairs in self.host.items()}
        self.in_flight: dict[str, tuple[list[torch.Tensor], object]] = {}
        self.moves: Counter = Counter()
        self.trace: list | None = None
        self.adopt_new_parameters()

    @property
    def host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for pairs in self.host.values() for _, h in pairs)

    def adopt_new_parameters(self) -> None:
        """Put every parameter of a swapped block that the swap does not own (the LoRA) on the device, for good."""
        for name in self.names:
            self._adopt(name)

    def _adopt(self, name: str) -> None:
        for p in self.blocks[name].parameters():
            if id(p) not in self.owned[name] and p.device != self.device:
                p.data = p.data.to(self.device)

    def request(self, name: str) -> None:
        """Start copying block `name` to the device (no-op if its copy is already under way)."""
        if name in self.in_flight:
            return
        if self.trace is not None:
            self.trace.append(("request", name))
        with self.stream.context():
            copies = [h.to(self.device, non_blocking=True) for _, h in self.host[name]]
            event = self.stream.record_event()
        self.in_flight[name] = (copies, event)
        self.moves[name] += 1

    def _load(self, name: str) -> None:
        self.request(name)
        copies, event = self.in_flight.pop(name)
        self.stream.wait(event)
        for (p, _), copy in zip(self.host[name], copies):
            self.stream.keep_alive(copy)
            p.data = copy

    def _release(self, name: str) -> None:
        for p, host in self.host[name]:
            p.data = host  # autograd keeps the device storage it saved; the parameter lets go of it

    def _next(self, name: str) -> str | None:
        in_backward = torch._C._current_graph_task_id() != -1  # checkpointing recomputes blocks last to first
        i = self.names.index(name) + (-1 if in_backward else 1)
        return self.names[i] if 0 <= i < len(self.names) else None

    def run(self, name: str, forward, *args, **kwargs):
        self._adopt(name)
        self._load(name)
        following = self._next(name)
        if following is not None:
            self.request(following)
        if self.trace is not None:
            self.trace.append(("run", name))
        try:
            return forward(*args, **kwargs)
        finally:
            self._release(name)

    def herald(self, forward, *args, **kwargs):
        """The forward of the resident block just before the first swapped one: prefetch that one first."""
        if torch._C._current_graph_task_id() == -1:
            self.request(self.names[0])
        return forward(*args, **kwargs)


def _wrap(block: torch.nn.Module, method) -> None:
    forward = block.forward

    def wrapped(*args, **kwargs):
        return method(forward, *args, **kwargs)

    block.forward = wrapped  # an instance attribute: block(...) and checkpoint(block, ...) both run it


def place(model: torch.nn.Module, device, offload_blocks=0) -> BlockSwap | None:
    """Move `model` to `device`, except the base weights of its last `offload_blocks` blocks (an int, or
    "auto"), which stay in (pinned) host memory and stream in as they run. 0: exactly `model.to(device)`.
    Returns the BlockSwap (None when nothing is swapped)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # parameters report an index: compare like with like
    blocks = swappable_blocks(model)
    if offload_blocks in (0, "0", None):
        model.to(device)
        return None
    if not blocks:
        raise ValueError(f"model.offload_blocks: {type(model).__name__} has no blocks (ModuleList children) to swap; "
                         "set model.offload_blocks to 0")
    block_ids = {id(p) for _, b in blocks for p in b.parameters()}
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in block_ids)
    on_device = sum(p.numel() * p.element_size() for p in model.parameters() if p.device == device)
    n = resolve_offload_blocks(offload_blocks, blocks, other, device, on_device)
    swapped, resident = blocks[len(blocks) - n:], blocks[: len(blocks) - n]
    if n == 0:
        model.to(device)
        log.info("block swap: 'auto' found room for every block on %s; nothing swapped", device)
        return None
    for _, block in swapped:  # host first, so the device never holds the swapped blocks whole
        block.to("cpu")
    keep = {id(p) for _, b in swapped for p in b.parameters()}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) not in keep:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)
    swap = BlockSwap(swapped, device)
    _blocks_root(model)._block_swap = swap  # adopt_lora finds it from the module that carries the LoRA
    for name, block in swapped:
        _wrap(block, lambda forward, *a, __n=name, **k: swap.run(__n, forward, *a, **k))
    if resident:
        _wrap(resident[-1][1], swap.herald)
    log.info("block swap: %d of %d blocks (%.2f GiB) on the host, streamed to %s one block ahead",
             n, len(blocks), swap.host_bytes / GIB, device)
    return swap
