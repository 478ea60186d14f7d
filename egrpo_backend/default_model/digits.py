"""scikit-learn's bundled handwritten digits as 1x16x16 images, their prompts and the held-out eval set.

Images: `load_digits()` gives 8x8 images with values 0..16. We scale to [0, 1], upsample to 16x16 with
bilinear interpolation (torch.nn.functional.interpolate, align_corners=False) and map to [-1, 1], the
model's latent space. The reward classifier and the metrics use the same 16x16 images in [0, 1].

Prompts: five phrasings per digit so the text matters (names and numerals). Pretraining and RL use the
same templates; the held-out eval set holds out the SEEDS (10_000 and up, which training never uses),
not the phrasing: 10 digits x 20 seeds, each digit seen four times with every template.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 16
SPLIT_SEED = 0  # fixed: the train / held-out split of the REAL images never changes
HELDOUT_FRACTION = 0.2
HELDOUT_SEED_BASE = 10_000  # eval seeds are 10_000 + k; training seeds stay below this
HELDOUT_SEEDS_PER_DIGIT = 20  # 200 pairs: a 95% interval of about +-0.06, so a real gain of 0.1 shows

# {name} = "three", {d} = "3"
TRAIN_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {d} written by hand",
    "a sketch of the numeral {name}",
    "digit: {name}",
    "a drawing of the number {d}",
)

_DIGIT = re.compile(r"(?<![a-z])(%s)(?![a-z])|(?<!\d)(\d)(?!\d)" % "|".join(DIGIT_NAMES))
_VALUE = {name: i for i, name in enumerate(DIGIT_NAMES)}


def prompt_for(digit: int, template: str = TRAIN_TEMPLATES[0]) -> str:
    """The prompt naming `digit` in one phrasing, e.g. prompt_for(3) -> 'a handwritten digit three'."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return template.format(name=DIGIT_NAMES[int(digit)], d=int(digit))


def digit_of_prompt(prompt: str) -> int:
    """Which digit a prompt names ('three' or '3'); ValueError if it names none or several.

    A digit is a whole word of letters that is a digit's name, or a number of one figure; one regular
    expression finds them (a job checks every prompt of its set with this before it starts)."""
    found = {_VALUE[name] if name else int(figure) for name, figure in _DIGIT.findall(str(prompt).lower())}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(
            f"prompt {prompt!r} names {what}; the digits model needs exactly one digit, "
            "written as a word ('three') or a numeral ('3'), e.g. 'a handwritten digit three'"
        )
    return found.pop()


def first_without_one_digit(prompts: list[str]) -> int | None:
    """The index of the first prompt that digit_of_prompt refuses, or None: the same answers, vectorized
    over the prompts' bytes (a job checks millions of prompts before it starts; docs/prompts.md)."""
    import numpy as np

    data = "\n".join(prompts).encode("utf-8")
    if len(data) != sum(map(len, prompts)) + len(prompts) - 1:  # non-ASCII text: lower() and \d are Unicode
        return next((i for i, p in enumerate(prompts) if not _names_one_digit(p)), None)
    arr = np.frombuffer(data, np.uint8)
    low = arr | ((arr >= 65) & (arr <= 90)).astype(np.uint8) * 32
    alpha = np.concatenate(((low >= 97) & (low <= 122), [False]))
    figure = np.concatenate(((arr >= 48) & (arr <= 57), [False]))
    hits, values = [], []
    for value, name in enumerate(DIGIT_NAMES):
        at = np.flatnonzero(low[: len(low) - len(name) + 1] == ord(name[0]))
        for k, ch in enumerate(name[1:], 1):
            at = at[low[at + k] == ord(ch)]
        at = at[~alpha[at - 1] | (at == 0)]
        at = at[~alpha[at + len(name)]]
        hits.append(at)
        values.append(np.full(at.size, value))
    before = np.concatenate(([False], figure[:-2]))
    single = np.flatnonzero(figure[:-1] & ~before & ~figure[1:])
    hits.append(single)
    values.append(arr[single].astype(np.int64) - 48)
    line = np.searchsorted(np.flatnonzero(arr == 10), np.concatenate(hits))  # the prompt each hit is in
    named = np.zeros(len(prompts), np.int32)  # bit d set: the prompt names digit d
    np.bitwise_or.at(named, line, (1 << np.concatenate(values)).astype(np.int32))
    bad = np.flatnonzero((named == 0) | (named & (named - 1) != 0))  # none, or more than one bit
    return int(bad[0]) if bad.size else None


def _names_one_digit(prompt: str) -> bool:
    try:
        digit_of_prompt(prompt)
        return True
    except ValueError:
        return False


def train_prompts() -> list[str]:
    """The 50 prompts (10 digits x 5 templates) used for pretraining and RL training."""
    return [prompt_for(d, t) for t in TRAIN_TEMPLATES for d in range(10)]


def heldout_eval_set() -> list[tuple[str, int]]:
    """200 fixed (prompt, seed) pairs: 10 digits x 20 seeds from 10_000 up, templates cycled."""
    out = []
    for d in range(10):
        for k in range(HELDOUT_SEEDS_PER_DIGIT):
            seed = HELDOUT_SEED_BASE + d * HELDOUT_SEEDS_PER_DIGIT + k
            out.append((prompt_for(d, TRAIN_TEMPLATES[k % len(TRAIN_TEMPLATES)]), seed))
    return out


def to_16x16(images_8x8: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] values 0..16 -> [N, 1, 16, 16] in [0, 1] (bilinear, align_corners=False)."""
    x = images_8x8.float().div(16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0)


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return to_16x16(torch.as_tensor(data.images)), torch.as_tensor(data.target, dtype=torch.long)


@lru_cache(maxsize=1)
def _split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    # Stratified per digit so both splits hold every class in the same proportion.
    _, labels = _all_digits()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, held = [], []
    for d in range(10):
        idx = (labels == d).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_held = round(HELDOUT_FRACTION * idx.numel())
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def real_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """REAL digit images [N, 1, 16, 16] in [0, 1] and labels [N] of the 'train' or 'heldout' split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; valid: 'train', 'heldout'")
    images, labels = _all_digits()
    idx = _split_indices()[0 if split == "train" else 1]
    return images[idx].clone(), labels[idx].clone()


def to_latent(images01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the model's latent space [-1, 1]."""
    return images01 * 2.0 - 1.0


def decode(latents: torch.Tensor) -> torch.Tensor:
    """The model's latents -> images in [0, 1]."""
    return ((latents + 1.0) / 2.0).clamp(0.0, 1.0)
