"""Independent, reproducible random streams: one per purpose, derived from (seed, purpose, iteration, index).

Purposes: "rollout" (index = the prompt's slot in the prompt stream, so a prompt's noise does not
depend on which prompts share its batch, process or rank), "branch" (where groups branch),
"subset" (which transitions a DanceGRPO-style update trains), "shuffle" (minibatch order),
"prompt_order" (iteration = the epoch of the prompt stream), "nft" (DiffusionNFT's training sigmas and
forward noise; index = the prompt's slot, like "rollout"). A run resumed at iteration k draws
exactly what a straight run draws there. Hashing keeps these seeds far from the small seeds that
held-out evaluation uses (10000 + i).
"""

from __future__ import annotations

import hashlib

import torch

PURPOSES = ("rollout", "branch", "subset", "shuffle", "prompt_order", "nft")


def stream_generator(seed: int, purpose: str, iteration: int, index: int = 0) -> torch.Generator:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random stream {purpose!r}; valid: {', '.join(PURPOSES)}")
    digest = hashlib.sha256(f"egrpo/{purpose}/{seed}/{iteration}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
