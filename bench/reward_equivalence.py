"""Do our converted reward models compute what the reference implementations compute?

The references are not project dependencies (docs/rewards.md), so this runs in a side
environment where they import, on random-weight models (no published weights are needed):
  - HPS v2: HPSv2's own bundled open_clip (model, tokenizer, evaluation transform) -> our `hpsv2`;
  - CLIP score: open_clip (PyPI open_clip_torch) -> our `clip_score` from an open_clip checkpoint;
  - PickScore: the authors' recipe (transformers CLIPModel + CLIP tokenizer, logit_scale * cosine);
  - ImageReward: THUDM/ImageReward's BLIP ViT (vit.py), BERT with cross-attention (med.py), MLP and
    `ImageReward.score_gard` -> our `imagereward`;
  - LAION aesthetic v2: open_clip ViT (QuickGELU, as OpenAI's ViT-L/14) + the MLP class the
    predictor's code defines (ImageReward's AestheticScore.MLP copy), on the published head weights
    when available -> our `laion_aesthetic`;
  - CLIP tokenizer and image preprocessing against open_clip's tokenizer and torchvision.
Pass: max |difference| < 1e-4 on the same inputs. Each check prints PASS / FAIL / SKIP (with the
reason a reference could not be imported); the exit code is 1 only when a check fails.

Reference images: the originals resize PIL images (except HPS, which resizes tensors); we resize
tensors like torchvision does. So models are compared on identical tensor inputs, our preprocessing
is compared with torchvision's tensor transforms, and the PIL-vs-tensor resampling gap is printed as
information, not as a pass/fail number.

Side environment (about 2 minutes, 5.5 GB):
  python3 -m venv /tmp/ref-venv
  /tmp/ref-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch transformers==5.24.0 \
      safetensors timm fairscale ftfy regex
Reference sources (read, never copied into this repository): the `ImageReward` package folder of
github.com/THUDM/ImageReward and the `hpsv2` package folder of github.com/tgxs002/HPSv2, side by side
in one folder, optionally with the aesthetic predictor's `sac+logos+ava1-l14-linearMSE.pth`
(github.com/christophschuhmann/improved-aesthetic-predictor):
  /tmp/ref-venv/bin/python bench/reward_equivalence.py --ref-src FOLDER      (or EGRPO_REF_SRC=FOLDER)
ImageReward's med.py was written for transformers 4; four helpers it inherits from transformers 4's
PreTrainedModel (init_weights, invert_attention_mask, get_head_mask, and three imports that moved to
transformers.pytorch_utils) are restored below exactly as transformers 4 defined them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-4
PROMPTS = ["a photo of a cat", "A red bicycle leaning on a wall, oil painting", "an astronaut riding a horse on mars",
           "two dogs & a ball"]
TOKENIZER_PROMPTS = PROMPTS + [
    "", "  many   spaces\tand\nnewlines  ", "UPPER case Words!!", "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "emoji \U0001f431\U0001f680 ok", "numbers 1234567 3.14",
    "html &amp; entities &lt;b&gt;", "don't won't it's we're", "hyphen-ated under_score dot.ted",
    "word " * 120, "supercalifragilisticexpialidocious antidisestablishmentarianism",
]
failures: list[str] = []


def report(name: str, diff: float | None = None, detail: str = "", skip: str | None = None) -> None:
    if skip is not None:
        print(f"SKIP  {name}: {skip}")
        return
    ok = diff is not None and diff < TOL
    if not ok:
        failures.append(name)
    print(f"{'PASS' if ok else 'FAIL'}  {name:<44} max|diff| = {diff:.2e}  {detail}")


def info(text: str) -> None:
    print(f"INFO  {text}")


# ------------------------------------------------------------------ importing the references


def _package(name: str, path: Path) -> None:
    """Register a package without running its __init__ (which imports training code we do not need)."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module


def import_hpsv2(src: Path):
    root = src / "hpsv2"
    if not (root / "src" / "open_clip" / "model.py").is_file():
        raise ImportError(f"no hpsv2/src/open_clip/model.py under {src}")
    _package("hpsv2", root)
    _package("hpsv2.src", root / "src")
    _package("hpsv2.src.open_clip", root / "src" / "open_clip")
    return types.SimpleNamespace(
        model=importlib.import_module("hpsv2.src.open_clip.model"),
        tokenizer=importlib.import_module("hpsv2.src.open_clip.tokenizer"),
        transform=importlib.import_module("hpsv2.src.open_clip.transform"),
        bpe=root / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz",
    )


def import_imagereward(src: Path):
    root = src / "ImageReward"
    if not (root / "models" / "BLIP" / "med.py").is_file():
        raise ImportError(f"no ImageReward/models/BLIP/med.py under {src}")
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    # transformers 5 moved these out of modeling_utils; med.py imports them from there.
    modeling_utils.apply_chunking_to_forward = pytorch_utils.apply_chunking_to_forward
    modeling_utils.prune_linear_layer = pytorch_utils.prune_linear_layer
    modeling_utils.find_pruneable_heads_and_indices = _unused
    _package("ImageReward", root)
    _package("ImageReward.models", root / "models")
    _package("ImageReward.models.BLIP", root / "models" / "BLIP")
    sys.modules.setdefault("clip", types.ModuleType("clip"))  # AestheticScore.py imports OpenAI's clip; MLP does not use it
    med = importlib.import_module("ImageReward.models.BLIP.med")
    _restore_transformers4_helpers(med.BertModel)
    source = (root / "ImageReward.py").read_text()
    return types.SimpleNamespace(
        vit=importlib.import_module("ImageReward.models.BLIP.vit"),
        med=med,
        imagereward=importlib.import_module("ImageReward.ImageReward"),
        aesthetic=importlib.import_module("ImageReward.models.AestheticScore"),
        mean=float(re.search(r"self\.mean = ([0-9.eE+-]+)", source).group(1)),
        std=float(re.search(r"self\.std = ([0-9.eE+-]+)", source).group(1)),
    )


def _unused(*args, **kwargs):
    raise NotImplementedError("head pruning is not used when scoring")


def _restore_transformers4_helpers(cls) -> None:
    """transformers 4's ModuleUtilsMixin helpers that med.py's BertModel calls (removed in 5)."""

    def invert_attention_mask(self, mask):
        ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
        ext = ext.to(dtype=self.dtype)
        return (1.0 - ext) * torch.finfo(self.dtype).min

    def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
        return [None] * num_hidden_layers if head_mask is None else head_mask

    cls.init_weights = lambda self: None  # weights are randomised below anyway
    cls.invert_attention_mask = invert_attention_mask
    cls.get_head_mask = get_head_mask


# ------------------------------------------------------------------ shared helpers


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (LayerNorms included), scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / (p[0].numel() ** 0.5))
            elif "norm" in name.lower() or name.split(".")[-2:-1] in (["ln_1"], ["ln_2"]) or ".ln_" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def random_pil(n: int, size: tuple[int, int], seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    # smooth random images (a few colour blobs, upsampled) look more like photos than white noise
    base = torch.rand(n, 3, 6, 6, generator=g)
    big = F.interpolate(base, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    big = (big + 0.05 * torch.rand(big.shape, generator=g)).clamp(0, 1)
    return [Image.fromarray((b.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for b in big]


def to_tensor(pils) -> torch.Tensor:
    from torchvision.transforms.functional import to_tensor as tv_to_tensor

    return torch.stack([tv_to_tensor(p) for p in pils])


def crop_transform(size: int):
    """CLIP's evaluation transform, on tensors (torchvision resizes tensors with antialias=True)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

    from egrpo_backend.rewards.models.preprocess import CLIP_MEAN, CLIP_STD

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True), CenterCrop(size),
                    Normalize(CLIP_MEAN, CLIP_STD)])


# ------------------------------------------------------------------ the checks


def check_tokenizer(hps, bpe: Path) -> None:
    from egrpo_backend.rewards.models.clip_tokenizer import ClipTokenizer

    ours = ClipTokenizer(bpe)(TOKENIZER_PROMPTS, 77)
    references = {"HPSv2 open_clip tokenize": hps.tokenizer.tokenize(TOKENIZER_PROMPTS, context_length=77)}
    try:
        import open_clip

        references[f"open_clip {open_clip.__version__} tokenizer"] = open_clip.get_tokenizer("ViT-H-14")(TOKENIZER_PROMPTS)
    except ImportError as e:
        report("CLIP tokenizer vs open_clip", skip=f"open_clip not importable ({e})")
    for label, ref in references.items():
        # ids up to and including EOT must agree; after it open_clip pads with 0, we with EOT (never read)
        eot = ours.argmax(dim=1)  # EOT has the largest id
        bad = [p for i, p in enumerate(TOKENIZER_PROMPTS) if not torch.equal(ours[i, : eot[i] + 1], ref[i, : eot[i] + 1])]
        diff = 0.0 if not bad else float("inf")
        report(f"CLIP tokenizer vs {label}", diff, f"{len(TOKENIZER_PROMPTS) - len(bad)}/{len(TOKENIZER_PROMPTS)} "
               f"prompts give identical ids{'; differ: ' + repr(bad[:3]) if bad else ''}")


def check_preprocess(hps) -> None:
    from egrpo_backend.rewards.models.preprocess import preprocess

    worst_crop = worst_pad = 0.0
    hps_val = hps.transform.image_transform(224, is_train=False, resize_longest_max=True)
    tensor_steps = hps_val.transforms[2:]  # after convert-to-RGB and ToTensor: ResizeMaxSize, Normalize
    for i, (h, w) in enumerate([(300, 200), (180, 400), (224, 224), (97, 131), (512, 512)]):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(i))
        worst_crop = max(worst_crop, (preprocess(x, 224, "crop") - crop_transform(224)(x)).abs().max().item())
        ref = x[0]
        for t in tensor_steps:
            ref = t(ref)
        worst_pad = max(worst_pad, (preprocess(x, 224, "pad")[0] - ref).abs().max().item())
    report("preprocess crop vs torchvision Resize+Crop", worst_crop, "5 image sizes")
    report("preprocess pad vs HPSv2 ResizeMaxSize", worst_pad, "5 image sizes")
    # information only: the originals (but HPS) resize PIL images, then convert to tensors
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    from egrpo_backend.rewards.models.preprocess import CLIP_MEAN, CLIP_STD

    pil = random_pil(1, (300, 200), seed=9)[0]
    via_pil = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor(),
                       Normalize(CLIP_MEAN, CLIP_STD)])(pil)
    gap = (preprocess(to_tensor([pil]), 224, "crop")[0] - via_pil).abs()
    info(f"PIL-resize vs tensor-resize pixels (CLIP/PickScore/ImageReward/aesthetic originals use PIL): "
         f"mean |diff| {gap.mean():.2e}, max {gap.max():.2e} (normalised units)")


def check_hps(hps, work: Path) -> None:
    from egrpo_backend.rewards import build_reward
    from egrpo_backend.rewards.models import convert_to_safetensors

    m = hps.model
    torch.manual_seed(0)
    # HPS's architecture (ViT-H-14: 16 heads of width 80, exact GELU), shrunk: 2 heads of width 40
    ref = m.CLIP(embed_dim=32, vision_cfg=m.CLIPVisionCfg(layers=2, width=80, head_width=40, patch_size=14, image_size=224),
                 text_cfg=m.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2), output_dict=True)
    randomize_(ref, seed=1)
    ckpt = work / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": ref.state_dict(), "epoch": 1}, ckpt)  # the published files' layout
    pils = random_pil(len(PROMPTS), (320, 200), seed=2)  # not square: exercises the padding
    preprocess_val = hps.transform.image_transform(224, is_train=False, resize_longest_max=True)
    with torch.no_grad():
        images = torch.stack([preprocess_val(p) for p in pils])
        text = hps.tokenizer.tokenize(PROMPTS)
        out = ref(images, text)  # as hpsv2.img_score.score: normalised features, diagonal of the logits
        want = torch.diagonal(out["image_features"] @ out["text_features"].T)
    ours = build_reward("hpsv2", path=str(ckpt), tokenizer=str(hps.bpe), vision_heads=2, text_heads=4, device="cpu")
    got = ours(to_tensor(pils), PROMPTS)
    report("hpsv2 (HPSv2 open_clip + transform)", (got - want).abs().max().item(), f"scores {want.numpy().round(4)}")
    st = convert_to_safetensors(ckpt)
    again = build_reward("hpsv2", path=str(st), tokenizer=str(hps.bpe), vision_heads=2, text_heads=4, device="cpu")
    report("hpsv2 from convert_to_safetensors file", (again(to_tensor(pils), PROMPTS) - want).abs().max().item())


def check_clip_score(bpe: Path, work: Path) -> None:
    try:
        import open_clip
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    except ImportError as e:
        report("clip_score (open_clip checkpoint)", skip=f"open_clip not importable ({e})")
        return
    from safetensors.torch import save_file

    from egrpo_backend.rewards import build_reward

    torch.manual_seed(0)
    ref = CLIP(embed_dim=24, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=224),
               text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=48, heads=3, layers=2))
    randomize_(ref, seed=3)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(work / "open_clip_model.safetensors"))
    x = to_tensor(random_pil(len(PROMPTS), (256, 300), seed=4))
    with torch.no_grad():
        img = F.normalize(ref.encode_image(crop_transform(224)(x)), dim=-1)
        txt = F.normalize(ref.encode_text(open_clip.get_tokenizer("ViT-H-14")(PROMPTS)), dim=-1)
        want = (img * txt).sum(-1)
    ours = build_reward("clip_score", path=str(work / "open_clip_model.safetensors"), tokenizer=str(bpe),
                        vision_heads=2, text_heads=3, device="cpu")
    report(f"clip_score (open_clip {open_clip.__version__} checkpoint)", (ours(x, PROMPTS) - want).abs().max().item())


def check_pickscore(bpe: Path, work: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from egrpo_backend.rewards import build_reward
    from egrpo_backend.rewards.models.clip_tokenizer import vocab_from_bpe_gz

    folder = work / "PickScore_v1"
    vocab, merges = vocab_from_bpe_gz(bpe)  # the laion repo's vocab.json / merges.txt are this vocabulary
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=3, hidden_act="gelu", projection_dim=24),
                     vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=224, patch_size=16, hidden_act="gelu", projection_dim=24),
                     projection_dim=24)
    torch.manual_seed(0)
    model = randomize_(CLIPModel(cfg), seed=5)
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)  # PickScore's trained value, ln(100)
    model.save_pretrained(str(folder))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    x = to_tensor(random_pil(len(PROMPTS), (240, 260), seed=6))
    want = []
    with torch.no_grad():  # the PickScore README's calc_probs, one prompt per image
        for i, prompt in enumerate(PROMPTS):
            image_embs = model.get_image_features(pixel_values=crop_transform(224)(x[i : i + 1])).pooler_output
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_inputs = tokenizer(prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            text_embs = model.get_text_features(**text_inputs).pooler_output
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            want.append(model.logit_scale.exp() * (text_embs @ image_embs.T)[0])
    want = torch.cat(want)
    ours = build_reward("pickscore", path=str(folder), device="cpu")
    report("pickscore (authors' recipe)", (ours(x, PROMPTS) - want).abs().max().item(), f"scores {want.numpy().round(3)}")


def check_imagereward(ir, work: Path) -> None:
    from transformers import BertTokenizer

    from egrpo_backend.rewards import build_reward

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w.strip(",.&!") for p in PROMPTS for w in p.lower().split()} - {""})
    med_config = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                      hidden_dropout_prob=0.1, hidden_size=64, initializer_range=0.02, intermediate_size=128,
                      layer_norm_eps=1e-12, max_position_embeddings=512, model_type="bert", num_attention_heads=2,
                      num_hidden_layers=2, pad_token_id=0, type_vocab_size=2, vocab_size=len(words) + 2,
                      encoder_width=768, add_cross_attention=True)  # encoder_width as published; BLIP overrides it
    torch.manual_seed(0)
    vit = ir.vit.VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    bert_cfg = ir.med.BertConfig(**med_config)
    bert_cfg.encoder_width = 32  # what BLIP_Pretrain does: encoder_config.encoder_width = vision_width
    bert = ir.med.BertModel(config=bert_cfg, add_pooling_layer=False)
    mlp = ir.imagereward.MLP(64)
    blip = torch.nn.Module()
    blip.visual_encoder, blip.text_encoder = vit, bert
    blip.vision_proj, blip.text_proj = torch.nn.Linear(32, 16), torch.nn.Linear(64, 16)
    whole = torch.nn.Module()
    whole.blip, whole.mlp = blip, mlp
    randomize_(whole, seed=7)
    folder = work / "ImageReward"
    (folder / "bert-base-uncased").mkdir(parents=True)
    torch.save(whole.state_dict(), folder / "ImageReward.pt")  # the published file is this state dict
    (folder / "med_config.json").write_text(json.dumps(med_config))
    (folder / "bert-base-uncased" / "vocab.txt").write_text("\n".join(words) + "\n")

    tokenizer = BertTokenizer.from_pretrained(str(folder / "bert-base-uncased"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP's init_tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    x = to_tensor(random_pil(len(PROMPTS), (300, 240), seed=8))
    ref = types.SimpleNamespace(blip=blip, mlp=mlp, mean=ir.mean, std=ir.std, device="cpu")
    with torch.no_grad():  # ImageReward.score, batched: score_gard is its body
        text = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        want = ir.imagereward.ImageReward.score_gard(ref, text.input_ids, text.attention_mask,
                                                     crop_transform(224)(x)).squeeze(-1)
    ours = build_reward("imagereward", path=str(folder / "ImageReward.pt"), vision_heads=2, device="cpu")
    report("imagereward (THUDM BLIP code)", (ours(x, PROMPTS) - want).abs().max().item(),
           f"scores {want.numpy().round(3)}; mean/std read from ImageReward.py: {ir.mean}, {ir.std}")


def check_aesthetic(ir, src: Path, work: Path) -> None:
    try:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    except ImportError as e:
        report("laion_aesthetic", skip=f"open_clip not importable ({e})")
        return
    from egrpo_backend.rewards import build_reward
    from egrpo_backend.rewards.models.openclip_convert import clip_from_openclip

    head_file = src / "sac+logos+ava1-l14-linearMSE.pth"
    mlp = ir.aesthetic.MLP(768)
    if head_file.is_file():
        mlp.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
        which = "published head weights"
    else:
        randomize_(mlp, seed=10)
        head_file = work / "sac+logos+ava1-l14-linearMSE.pth"
        torch.save(mlp.state_dict(), head_file)
        which = "random head (published file not found)"
    mlp.eval()
    torch.manual_seed(0)
    # OpenAI's ViT-L/14 shape where it matters: QuickGELU, 768-d embedding; tiny elsewhere
    ref = CLIP(embed_dim=768, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=14, image_size=224),
               text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=48, heads=3, layers=1), quick_gelu=True)
    randomize_(ref, seed=11)
    # users hold the transformers folder openai/clip-vit-large-patch14: make one from the same weights
    clip_from_openclip(ref.state_dict(), vision_heads=2, text_heads=3, hidden_act="quick_gelu").save_pretrained(
        str(work / "clip-vit-large-patch14"))
    x = to_tensor(random_pil(len(PROMPTS), (224, 300), seed=12))
    with torch.no_grad():  # AestheticScore.score: F.normalize(clip.encode_image(image)) -> MLP
        want = mlp(F.normalize(ref.encode_image(crop_transform(224)(x))).float()).squeeze(-1)
    ours = build_reward("laion_aesthetic", path=str(head_file), clip_path=str(work / "clip-vit-large-patch14"),
                        device="cpu")
    report("laion_aesthetic (open_clip QuickGELU + MLP)", (ours(x, ["unused"] * len(PROMPTS)) - want).abs().max().item(),
           f"{which}; scores {want.numpy().round(3)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref-src", default=os.environ.get("EGRPO_REF_SRC"),
                        help="folder holding the ImageReward and hpsv2 package folders (default: $EGRPO_REF_SRC)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:  # progress bars of save/load would interleave with the report lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    versions = {}
    for mod in ("torch", "torchvision", "transformers", "open_clip", "timm"):
        try:
            versions[mod] = importlib.import_module(mod).__version__
        except ImportError:
            versions[mod] = "not importable"
    info("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if versions["torchvision"] == "not importable":
        report("all checks", skip="torchvision is not importable here; run this in the side environment "
               "described at the top of bench/reward_equivalence.py")
        return 0
    src = Path(args.ref_src) if args.ref_src else None
    hps = ir = None
    why_hps = why_ir = "no --ref-src / EGRPO_REF_SRC given (see the top of this file)"
    if src is not None:
        try:
            hps = import_hpsv2(src)
        except Exception as e:  # any import failure means: reference unavailable, say why
            why_hps = f"HPSv2 code not importable from {src}: {type(e).__name__}: {e}"
        try:
            ir = import_imagereward(src)
        except Exception as e:
            why_ir = f"ImageReward code not importable from {src}: {type(e).__name__}: {e}"
    try:
        import open_clip

        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    except ImportError:
        bpe = hps.bpe if hps is not None else None
    with tempfile.TemporaryDirectory(prefix="egrpo-equiv-") as tmp:
        work = Path(tmp)
        if hps is not None:
            check_tokenizer(hps, hps.bpe)
            check_preprocess(hps)
            check_hps(hps, work)
        else:
            for name in ("CLIP tokenizer", "preprocessing", "hpsv2"):
                report(name, skip=why_hps)
        if bpe is not None:
            check_clip_score(bpe, work)
            check_pickscore(bpe, work)
        else:
            report("clip_score, pickscore", skip="no CLIP BPE vocabulary (open_clip nor HPSv2 importable)")
        if ir is not None:
            check_imagereward(ir, work)
            check_aesthetic(ir, src, work)
        else:
            for name in ("imagereward", "laion_aesthetic"):
                report(name, skip=why_ir)
    print(f"{'FAILED: ' + ', '.join(failures) if failures else 'all run checks passed'} (tolerance {TOL:g})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
