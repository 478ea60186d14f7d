"""A small CNN that tells which digit a 16x16 image shows; trained on REAL bundled digits only.

It is the judge behind the "digit_probability" reward, so it never sees generated images. Built at
first use (a few CPU seconds), then cached as safetensors in the cache dir ($EGRPO_CACHE, default
~/.cache/egrpo/); a missing, corrupt or stale file is rebuilt. Light augmentation (random shifts of
up to 1 px) keeps it from being brittle to the small misplacements generated digits have.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn

from .digits import real_digits

logger = logging.getLogger(__name__)

# Changing any of these changes the cache file's identity, so old files are rebuilt, not reused.
TRAIN_CONFIG = dict(version=1, seed=0, epochs=20, batch_size=64, lr=3e-3, weight_decay=1e-4, max_shift=1)
CACHE_NAME = "digits_classifier_v{version}.safetensors"


class DigitCNN(nn.Module):
    """[B, 1, 16, 16] in [0, 1] -> logits [B, 10]; two conv blocks and a small head (~40k params)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> 16 x 8 x 8
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> 32 x 4 x 4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cache_dir() -> Path:
    """$EGRPO_CACHE if set, else ~/.cache/egrpo."""
    return Path(os.environ.get("EGRPO_CACHE") or Path.home() / ".cache" / "egrpo")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to max_shift pixels in x and y, filling with background (0)."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    pad = nn.functional.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [b, 1, h, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [b, 1, 1, w]
    return pad[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def train_classifier(config: dict = TRAIN_CONFIG) -> DigitCNN:
    """Train on the real 'train' split; seeded, leaves the global RNG untouched."""
    images, labels = real_digits("train")
    g = torch.Generator().manual_seed(config["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config["epochs"])
    model.train()
    for _ in range(config["epochs"]):
        perm = torch.randperm(images.shape[0], generator=g)
        for i in range(0, perm.numel(), config["batch_size"]):
            idx = perm[i : i + config["batch_size"]]
            x = random_shift(images[idx], config["max_shift"], g)
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, split: str = "heldout") -> float:
    """Top-1 accuracy on a split of the REAL digits."""
    images, labels = real_digits(split)
    return float((model(images).argmax(1) == labels).float().mean())


def _config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def _try_load(path: Path, config: dict) -> DigitCNN | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("config") != _config_key(config):
            logger.info("digit classifier cache %s is from another config; rebuilding", path)
            return None
        model = DigitCNN()
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.eval()
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail
        logger.warning("digit classifier cache %s is unreadable (%s); rebuilding", path, e)
        return None


def _save_atomic(model: DigitCNN, path: Path, config: dict, acc: float) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp, metadata={"config": _config_key(config), "heldout_accuracy": f"{acc:.4f}"})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is a shared, rebuildable file
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_LOCK = threading.Lock()
_LOADED: dict[str, DigitCNN] = {}


def get_classifier(config: dict = TRAIN_CONFIG) -> DigitCNN:
    """The cached classifier (memory, then disk, else trained now and written to the cache dir)."""
    path = cache_dir() / CACHE_NAME.format(**config)
    key = str(path.resolve()) + _config_key(config)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        model = _try_load(path, config)
        if model is None:
            logger.info("training the digit classifier on real digits (first use; a few seconds)")
            model = train_classifier(config)
            acc = accuracy(model)
            logger.info("digit classifier held-out accuracy on real digits: %.4f; caching to %s", acc, path)
            _save_atomic(model, path, config, acc)
        for p in model.parameters():
            p.requires_grad_(False)
        _LOADED[key] = model
        return model
