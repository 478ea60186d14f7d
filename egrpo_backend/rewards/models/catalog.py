"""The files each reward model needs, their usual names in a reward folder, and where people get them.

One table for the loaders (which search it) and for `reward_status` (which reports it). Names are
relative to a reward folder (ComfyUI: models/egrpo_rewards/); the first found wins, so a converted
.safetensors is preferred to the .pt it came from. Every CLIP model here (OpenAI's and laion's) uses
the same BPE vocabulary, so any of the CLIP tokenizer sources fits any of them.
"""

from __future__ import annotations

from .clip_tokenizer import BPE_GZ
from .files import FilePart

LAION_H = "CLIP-ViT-H-14-laion2B-s32B-b79K"  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K as a folder
OPENAI_L = "clip-vit-large-patch14"  # openai/clip-vit-large-patch14 as a folder

CLIP_TOKENIZER = FilePart(
    "CLIP tokenizer",
    (f"{LAION_H}/vocab.json", f"{OPENAI_L}/vocab.json", "PickScore_v1/vocab.json", BPE_GZ, f"HPSv2/{BPE_GZ}"),
    f"It is vocab.json + merges.txt of any transformers CLIP folder (e.g. the Hugging Face repo "
    f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K, saved as the folder {LAION_H}), or open_clip's {BPE_GZ}; open_clip "
    "checkpoints do not contain it. Put one in the reward folder or pass tokenizer=PATH.",
)

CLIP_MODEL = FilePart(
    "CLIP model",
    (LAION_H, OPENAI_L),
    f"Get a transformers CLIP folder (config.json, model.safetensors, vocab.json, merges.txt), e.g. the Hugging Face "
    f"repo laion/CLIP-ViT-H-14-laion2B-s32B-b79K saved as the folder {LAION_H}, or pass path= a folder or an "
    "open_clip checkpoint file (then also tokenizer=).",
)

PICKSCORE_MODEL = FilePart(
    "PickScore model",
    ("PickScore_v1",),
    "Get the Hugging Face repo yuvalkirstain/PickScore_v1 (config.json + model.safetensors) and save it as the "
    "folder PickScore_v1, or pass path=. Its tokenizer is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's.",
)


def hps_checkpoint(version: str) -> FilePart:
    stem = {"v2.0": "HPS_v2_compressed", "v2.1": "HPS_v2.1_compressed"}[version]
    return FilePart(
        f"HPS {version} checkpoint",
        (f"{stem}.safetensors", f"{stem}.pt", f"HPSv2/{stem}.safetensors", f"HPSv2/{stem}.pt"),
        f"Get {stem}.pt from the Hugging Face repo xswu/HPSv2 and put it in the reward folder, or pass path=. "
        f"Convert it once with `convert_to_safetensors` to skip unpickling on every load.",
    )


HPS_VERSIONS = ("v2.0", "v2.1")

IMAGEREWARD_CHECKPOINT = FilePart(
    "ImageReward checkpoint",
    ("ImageReward/ImageReward.safetensors", "ImageReward/ImageReward.pt", "ImageReward.safetensors", "ImageReward.pt"),
    "Get ImageReward.pt and med_config.json from the Hugging Face repo THUDM/ImageReward and put them in the folder "
    "ImageReward inside the reward folder, or pass path=.",
)
IMAGEREWARD_CONFIG = FilePart(
    "ImageReward med_config.json",
    ("ImageReward/med_config.json", "med_config.json"),
    "Get med_config.json from the Hugging Face repo THUDM/ImageReward and put it beside ImageReward.pt, or pass config=.",
)
BERT_TOKENIZER = FilePart(
    "BERT tokenizer (vocab.txt)",
    ("ImageReward/bert-base-uncased/vocab.txt", "bert-base-uncased/vocab.txt", "ImageReward/vocab.txt"),
    "ImageReward tokenizes with bert-base-uncased: get vocab.txt from the Hugging Face repo google-bert/bert-base-uncased "
    "into the folder bert-base-uncased inside the reward folder, or pass tokenizer= (that vocab.txt or its folder).",
)

AESTHETIC_HEAD = FilePart(
    "aesthetic predictor head",
    ("sac+logos+ava1-l14-linearMSE.safetensors", "sac+logos+ava1-l14-linearMSE.pth"),
    "Get sac+logos+ava1-l14-linearMSE.pth from the GitHub repo christophschuhmann/improved-aesthetic-predictor and put "
    "it in the reward folder, or pass path=.",
)
AESTHETIC_CLIP = FilePart(
    "CLIP ViT-L/14 model",
    (OPENAI_L,),
    f"The aesthetic head reads OpenAI CLIP ViT-L/14 image embeddings: get the Hugging Face repo "
    f"openai/clip-vit-large-patch14 (config.json + model.safetensors) as the folder {OPENAI_L}, or pass clip_path=.",
)


def requirements() -> dict[str, dict[str, FilePart]]:
    """Reward name -> {role: FilePart} of the files its default options need (what reward_status reports)."""
    return {
        "clip_score": {"model": CLIP_MODEL},
        "pickscore": {"model": PICKSCORE_MODEL, "tokenizer": CLIP_TOKENIZER},
        "hpsv2": {"checkpoint": hps_checkpoint("v2.1"), "tokenizer": CLIP_TOKENIZER},
        "imagereward": {"checkpoint": IMAGEREWARD_CHECKPOINT, "config": IMAGEREWARD_CONFIG, "tokenizer": BERT_TOKENIZER},
        "laion_aesthetic": {"head": AESTHETIC_HEAD, "clip": AESTHETIC_CLIP},
    }


def optional_files() -> dict[str, dict[str, FilePart]]:
    """Files other options use (listed by reward_status when present): hpsv2 with version="v2.0"."""
    return {"hpsv2": {'checkpoint for version="v2.0"': hps_checkpoint("v2.0")}}
