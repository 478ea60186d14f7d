"""Test session settings: CPU only, no network, at most 2 threads (tiny models live in tiny_models.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "EGRPO_PROMPT_INDEX" not in os.environ:  # prompt-file indexes of the tests (prompt_sets.py): never in ~/.cache
    import tempfile

    os.environ["EGRPO_PROMPT_INDEX"] = tempfile.mkdtemp(prefix="egrpo-prompt-index-")

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
