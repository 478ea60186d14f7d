"""Memory-driven choices that cut time, as pure functions of measured bytes (docs/memory.md, "Overhead").

Each takes what a phase measured (its peak, from torch.cuda.max_memory_allocated) and the card's size,
and answers one question; the caller decides when to ask (bench/scale.py asks after the first iteration,
when every phase's peak is known). Nothing here allocates or measures.
"""

from __future__ import annotations

GIB = 2**30
MARGIN_BYTES = 2 * GIB  # kept free: CUDA context, cuBLAS / cuDNN workspaces, allocator slack (docs/memory.md)


def reward_stays_on_device(reward_bytes: int, total_bytes: int, peak_other_bytes: int,
                           margin_bytes: int = MARGIN_BYTES) -> bool:
    """Keep an offloaded reward model on the device for good when it fits beside the largest peak of the
    other phases (which then run with it resident): no host round trip per scored chunk."""
    return peak_other_bytes + reward_bytes + margin_bytes <= total_bytes


def chunk_size(per_item_bytes: float, fixed_bytes: float, total_bytes: int, current: int, limit: int,
               margin_bytes: int = MARGIN_BYTES) -> int:
    """The largest chunk (images per decode or score call) whose peak, fixed_bytes + n x per_item_bytes,
    stays within the card less the margin; never above `limit`, never below `current` (a chunk that ran
    stays allowed). per_item_bytes <= 0 (nothing measured): `current`."""
    if per_item_bytes <= 0:
        return current
    room = total_bytes - margin_bytes - fixed_bytes
    return max(current, min(limit, int(room // per_item_bytes)))
