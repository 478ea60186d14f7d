"""Test session settings: CPU only, no network, at most 2 threads (tiny models live in tiny_models.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
