"""Peak device memory of a computation, measured on the meta device: no weights, no time, any size.

`trace_peak(fn)` runs fn() with every op seen by a TorchDispatchMode that counts the bytes of every
storage an op creates, from creation until the storage is freed (a weakref on the storage object,
which torch keeps for as long as the storage lives: views, autograd's saved tensors and parameters
swapped by layerwise casting all keep it). The peak is what the CUDA caching allocator would report
as max_memory_allocated above the resident weights (counted exactly elsewhere), minus allocator
rounding and fragmentation.

Attention runs as a flash-attention stand-in (`flash_attention`): on meta, torch's SDPA takes its math
path and materialises the N x N scores, which the GPU's flash / memory-efficient kernels never do; the
stand-in keeps exactly what those kernels keep (q, k, v, output, and a float32 logsumexp per row).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self._tracked:
            nbytes = storage.nbytes()
            self._tracked.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._release, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.peak = max(self.peak, self.live)
        return out


class _FlashAttention(torch.autograd.Function):
    """Shapes and saved tensors of flash attention; no arithmetic (meta tensors only)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashAttention.apply(query, key, value)


@contextlib.contextmanager
def flash_sdpa():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = flash_attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def trace_peak(fn, resident: torch.nn.Module | None = None) -> int:
    """Peak bytes that fn() holds at once beyond `resident`'s parameters and buffers (run it on meta tensors).

    The resident storages are counted from the start, so a weight whose storage is swapped (layerwise
    casting re-creates the fp8 weight after each forward) is counted once, as on the device."""
    mode = LiveBytes()
    for t in [*resident.parameters(), *resident.buffers()] if resident is not None else []:
        mode.track(t)
    start = mode.live
    with flash_sdpa(), mode:
        fn()
    return max(0, mode.peak - start)
