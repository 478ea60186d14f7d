"""A diffusers pipeline's text encoders, on the device only while they encode (docs/memory.md, "Text encoders").

The encoders (CLIP, T5-XXL, Gemma ...) load from the pipeline folder only when a prompt is missing
from the cond store, sit on the device for one chunk of prompts (`session()`, docs/prompts.md) and
on the CPU between chunks, and `release()` drops every reference to them (they load again if needed).
Text features come from the pipeline's own `encode_prompt` (SD3, FLUX, Sana).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import torch

from .base import Cond

log = logging.getLogger(__name__)


def free_device_memory(device: torch.device) -> None:
    """Collect dropped modules now and hand their cached CUDA blocks back to the driver."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def encoder_names(index: dict) -> list[str]:
    """The text-encoder components a pipeline's model_index.json lists (saved ones only)."""
    return [k for k, v in index.items() if k.startswith("text_encoder") and isinstance(v, list) and v[0] is not None]


class PipelineTextEncoder:
    """callable(list[str]) -> Cond through the pipeline's encode_prompt; encoders loaded on first use.

    folder: the pipeline folder; transformer: the already loaded denoiser (SD3's encode_prompt reads
    its config when the T5 encoder is absent); absent: components saved as null, passed as None.
    """

    def __init__(self, folder: str | Path, family: str, transformer, device: torch.device, dtype: torch.dtype,
                 absent: dict | None = None, max_sequence_length: int | None = None):
        self.folder, self.family, self.transformer = Path(folder), family, transformer
        self.device, self.dtype, self.absent, self.max_len = torch.device(device), dtype, dict(absent or {}), max_sequence_length
        self.pipe = None  # the text-only pipeline, while loaded
        self._sessions = 0  # open session() blocks: the encoders stay on the device until the last ends

    def _load(self):
        from diffusers import DiffusionPipeline

        log.info("loading the text encoders of %s", self.folder)
        self.pipe = DiffusionPipeline.from_pretrained(str(self.folder), torch_dtype=self.dtype, local_files_only=True,
                                                      transformer=self.transformer, vae=None, **self.absent)
        return self.pipe

    def encoders(self) -> list[torch.nn.Module]:
        if self.pipe is None:
            return []
        return [m for name, m in self.pipe.components.items() if name.startswith("text_encoder") and m is not None]

    @contextlib.contextmanager
    def session(self):
        """The encoders on the device for a chunk of prompts, off it (on the CPU) after the chunk."""
        pipe = self.pipe or self._load()
        if not self._sessions:
            for m in self.encoders():
                m.to(self.device)
        self._sessions += 1
        try:
            yield pipe
        finally:  # off the device between chunks: the denoiser needs the room
            self._sessions -= 1
            if not self._sessions and self.device.type != "cpu":
                for m in self.encoders():
                    m.to("cpu")
                free_device_memory(self.device)

    def __call__(self, prompts: list[str]) -> Cond:
        with self.session() as pipe, torch.no_grad():
            return self._encode(pipe, prompts)

    def _encode(self, pipe, prompts: list[str]) -> Cond:
        kw = {"max_sequence_length": self.max_len} if self.max_len else {}
        if self.family == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                   do_classifier_free_guidance=False, **kw)
            return {"encoder_hidden_states": emb, "pooled_projections": pooled}
        if self.family == "flux":
            emb, pooled, _ = pipe.encode_prompt(prompts, prompts, device=self.device, **kw)
            return {"encoder_hidden_states": emb, "pooled_projections": pooled}
        emb, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device, **kw)
        return {"encoder_hidden_states": emb, "encoder_attention_mask": mask}

    def release(self) -> None:
        """Drop the encoders (and the text pipeline holding them); they reload if ever needed again."""
        self.pipe = None
        free_device_memory(self.device)
