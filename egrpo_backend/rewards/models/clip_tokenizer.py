"""CLIP's byte-level BPE tokenizer, read from local files, giving the ids open_clip and OpenAI CLIP give.

Sources, any of:
  - a folder with `vocab.json` + `merges.txt`, or that vocab.json (every transformers CLIP folder, e.g.
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K or openai/clip-vit-large-patch14);
  - open_clip's / OpenAI's `bpe_simple_vocab_16e6.txt.gz` (inside the open_clip-torch and
    clip-anytorch wheels, and in the HPSv2 repository), converted here to the same vocabulary.
The BPE itself is transformers' CLIPTokenizer (backed by `tokenizers`). Before it, text is cleaned as
open_clip does (ftfy when it is installed, HTML entities unescaped twice), which the transformers
tokenizer leaves out. Ids are [BOS] text [EOS], truncated to the context length with EOS kept last.
"""

from __future__ import annotations

import gzip
import html
import json
from pathlib import Path

import torch

BPE_GZ = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # open_clip / OpenAI read this many merge rules from the .gz
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

TOKENIZER_HINT = (
    "The CLIP tokenizer is vocab.json + merges.txt from a transformers CLIP folder (e.g. the Hugging Face repo "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K), or open_clip's bpe_simple_vocab_16e6.txt.gz (in the open_clip_torch "
    "wheel and the HPSv2 repository); open_clip checkpoints do not contain it. Pass tokenizer=PATH or put it in "
    "the reward folder."
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab_from_bpe_gz(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's SimpleTokenizer vocabulary: bytes, bytes + '</w>', one token per merge, BOS, EOS."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1] if line.strip()]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [_BOS, _EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _read_folder(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (folder / "merges.txt").read_text(encoding="utf-8").split("\n"):
        if line.startswith("#version") or not line.strip():
            continue
        merges.append(tuple(line.split()))
    return vocab, merges


def has_clip_tokenizer(path: str | Path) -> bool:
    """Whether `path` is (or is a folder holding) a CLIP tokenizer source."""
    p = Path(path)
    if p.is_file():
        return p.name.endswith(".txt.gz") or (p.name == "vocab.json" and (p.parent / "merges.txt").is_file())
    return ((p / "vocab.json").is_file() and (p / "merges.txt").is_file()) or (p / BPE_GZ).is_file()


def _clean(text: str) -> str:
    try:  # open_clip fixes mojibake with ftfy; optional here, a no-op on ordinary text
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return html.unescape(html.unescape(text)).strip()


class ClipTokenizer:
    """prompts -> LongTensor [B, context_length] of CLIP BPE ids, padded after EOS."""

    def __init__(self, path: str | Path):
        p = Path(path)
        if not has_clip_tokenizer(p):
            raise FileNotFoundError(f"no CLIP tokenizer at {str(p)!r}. {TOKENIZER_HINT}")
        if p.name == "vocab.json":
            p = p.parent  # merges.txt lies beside it
        if p.is_file():
            vocab, merges = vocab_from_bpe_gz(p)
        elif (p / "vocab.json").is_file():
            vocab, merges = _read_folder(p)
        else:
            vocab, merges = vocab_from_bpe_gz(p / BPE_GZ)
        for special in (_BOS, _EOS):
            if special not in vocab:
                raise ValueError(f"the CLIP tokenizer at {str(p)!r} has no {special} token; is it a CLIP vocabulary?")
        from transformers import CLIPTokenizer

        self._tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=10**6)
        self.bos_token_id, self.eos_token_id = vocab[_BOS], vocab[_EOS]
        self.vocab_size = len(vocab)
        self.source = str(p)

    def __call__(self, prompts: list[str], context_length: int = 77) -> torch.Tensor:
        enc = self._tok(
            [_clean(t) for t in prompts],
            padding="max_length",
            truncation=True,
            max_length=context_length,
            return_tensors="pt",
        )
        return enc["input_ids"]
