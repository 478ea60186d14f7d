"""Seconds and peak device memory per phase of an iteration (rollout, decode, reward, update).

A phase may run in several chunks (decode and reward alternate per chunk): its seconds add up and
its peak is the largest of its chunks. Peak memory is torch.cuda.max_memory_allocated, reset when
the phase starts; on a CPU device it is None (process RSS says nothing about one phase).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.device = torch.device(device)
        self.phases: dict[str, dict] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            peak = None
            if self.cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            entry = self.phases.setdefault(name, {"seconds": 0.0, "peak_mem_gb": None})
            entry["seconds"] += time.perf_counter() - start
            if peak is not None:
                entry["peak_mem_gb"] = max(peak, entry["peak_mem_gb"] or 0.0)
