"""Global update-input ids for a rank's rollout, so every rank draws the minibatches one process draws.

The rollout records inputs window position by window position and, within one, prompt-major
(rollout.py); each prompt contributes the same count to a position. A rank that holds prompts
[rank * P_local, (rank + 1) * P_local) therefore holds, in every position's block, the rank-th slice
of the one-process block: global id = world * block_start + rank * block_size + offset.
"""

from __future__ import annotations

import torch


def input_positions(input_id: torch.Tensor, window_pos: torch.Tensor, n_inputs: int) -> torch.Tensor:
    """[U] window position of every input (all its transitions share it)."""
    pos = torch.empty(n_inputs, dtype=torch.long)
    pos[input_id] = window_pos.long()
    return pos


def global_unit_ids(input_id: torch.Tensor, window_pos: torch.Tensor, n_inputs: int, rank: int, world: int) -> torch.Tensor:
    """[U] the one-process id of each local input."""
    pos = input_positions(input_id, window_pos, n_inputs)
    out = torch.empty(n_inputs, dtype=torch.long)
    start = 0
    for p in pos.unique(sorted=True).tolist():
        size = int((pos == p).sum())
        out[start : start + size] = world * start + rank * size + torch.arange(size)
        start += size
    return out
