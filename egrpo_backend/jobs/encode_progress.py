"""Encoding progress, apart from training (docs/prompts.md): `encode` events for the panel and a bar
of its own on the command line, while a chunk of prompts is encoded ahead of use."""

from __future__ import annotations

import time

EVENT_EVERY_S = 2.0  # at most one event this often within a chunk (plus its first and last)


class EncodeProgress:
    """callable(done, total) for Trainer.on_encode: emits {"type": "encode", iteration, done, total,
    set_size, encoded, seconds} and drives a tqdm bar "encoding" (closed at the end of each chunk)."""

    def __init__(self, events, trainer, progress: bool):
        self.events, self.trainer, self.progress = events, trainer, progress
        self.bar, self.started, self.last, self.encoded = None, 0.0, 0.0, 0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 1:
            self.started, self.last = now, 0.0
            if self.progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="encoding", unit="prompt", leave=False)
        self.encoded += 1
        if self.bar is not None:
            self.bar.update(1)
        if done in (1, total) or now - self.last >= EVENT_EVERY_S:
            self.last = now
            self.events.emit("encode", iteration=self.trainer.state.iteration, done=done, total=total,
                             set_size=len(self.trainer.prompts), encoded=self.encoded, seconds=now - self.started)
        if done == total and self.bar is not None:
            self.bar.close()
            self.bar = None
