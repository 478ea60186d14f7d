"""Reward models from local files (CLIP score, PickScore, HPS v2, ImageReward, LAION aesthetic) on tiny
random-config models written to tmp folders as real files: shapes, batching, determinism, placement,
key conversions, tokenizer, preprocessing and error messages. CPU only, no network.

The fake published checkpoints (open_clip-format HPS, ImageReward.pt) are produced from tiny
transformers models by the inverse key maps written out below, independently of the code under test;
bench/reward_equivalence.py checks the same conversions against real open_clip and BLIP code.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from egrpo_backend.rewards import WeightedRewards, build_reward
from egrpo_backend.rewards.models import (
    RewardFileNotFound,
    UnsafeCheckpointError,
    convert_to_safetensors,
    load_state_dict,
    reward_status,
)
from egrpo_backend.rewards.models.clip_tokenizer import ClipTokenizer, bytes_to_unicode
from egrpo_backend.rewards.models.openclip_convert import openclip_to_transformers
from egrpo_backend.rewards.models.preprocess import normalize, preprocess, resize_crop, resize_pad

PROMPTS = ["a red cat", "a blue dog on grass", "a red cat"]  # a repeated prompt: text is encoded once per group
MERGES = [("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>"), ("d", "o"), ("do", "g</w>")]


# ---------------------------------------------------------------- tiny files written by the tests


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A real CLIP-format vocabulary: every byte, every byte + '</w>', one token per merge, BOS, EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, MERGES


def write_clip_tokenizer(folder):
    vocab, merges = tiny_clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def tiny_clip_config(vocab_size: int, eos: int, projection: int = 16):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, hidden_act="gelu", projection_dim=projection, eos_token_id=eos,
                bos_token_id=eos - 1, pad_token_id=eos)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act="gelu", projection_dim=projection)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection, logit_scale_init_value=4.6)


def randomize_(model, seed: int):
    """Random values for every weight (LayerNorms included) so no conversion mistake hides behind 1s and 0s."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if "norm" in name.lower() and name.endswith("weight") else noise)
    return model.eval()


def tiny_clip(seed: int = 0):
    from transformers import CLIPModel

    vocab, _ = tiny_clip_vocab()
    return randomize_(CLIPModel(tiny_clip_config(len(vocab), vocab["<|endoftext|>"])), seed)


def to_openclip(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the conversion, written out by hand from open_clip's names (the fake HPS file)."""
    sd = {
        "visual.conv1.weight": hf_sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf_sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf_sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf_sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf_sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf_sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf_sd["vision_model.post_layernorm.bias"],
        "visual.proj": hf_sd["visual_projection.weight"].t(),
        "token_embedding.weight": hf_sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf_sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf_sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf_sd["text_model.final_layer_norm.bias"],
        "text_projection": hf_sd["text_projection.weight"].t(),
        "logit_scale": hf_sd["logit_scale"],
    }
    for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
        n = 0
        while f"{tower}.encoder.layers.{n}.layer_norm1.weight" in hf_sd:
            src, dst = f"{tower}.encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
            for kind in ("weight", "bias"):
                sd[dst + f"attn.in_proj_{kind}"] = torch.cat([hf_sd[src + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
                sd[dst + f"attn.out_proj.{kind}"] = hf_sd[src + f"self_attn.out_proj.{kind}"]
                sd[dst + f"ln_1.{kind}"] = hf_sd[src + f"layer_norm1.{kind}"]
                sd[dst + f"ln_2.{kind}"] = hf_sd[src + f"layer_norm2.{kind}"]
                sd[dst + f"mlp.c_fc.{kind}"] = hf_sd[src + f"mlp.fc1.{kind}"]
                sd[dst + f"mlp.c_proj.{kind}"] = hf_sd[src + f"mlp.fc2.{kind}"]
            n += 1
    return {k: v.clone() for k, v in sd.items()}


def tiny_head(in_dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(in_dim, 24), (24, 12), (12, 8), (8, 4), (4, 1)]
    return {f"layers.{i}.{p}": (torch.randn(o, n, generator=g) if p == "weight" else torch.randn(o, generator=g)) * 0.3
            for i, (n, o) in zip((0, 2, 4, 6, 7), sizes) for p in ("weight", "bias")}


def tiny_blip(seed: int = 0):
    """Tiny transformers BLIP vision + text (cross-attention) models, a med_config and a WordPiece vocab."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cat", "dog", "on", "grass", "##s"]
    med = dict(vocab_size=len(vocab) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-12,
               pad_token_id=0, encoder_width=24, add_cross_attention=True, model_type="bert")
    vcfg = BlipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, layer_norm_eps=1e-6)
    tcfg = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=24, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40, is_decoder=True,
                          bos_token_id=None, eos_token_id=None, sep_token_id=None, use_cache=False)
    vision = randomize_(BlipVisionModel(vcfg), seed)
    text = randomize_(BlipTextModel(tcfg, add_pooling_layer=False), seed + 1)
    return vision, text, med, vocab


def to_imagereward(vision_sd, text_sd, head_sd) -> dict[str, torch.Tensor]:
    """ImageReward.pt's layout (BLIP's timm-style ViT names, med.py text names, mlp.layers.*), by hand."""
    sd = {
        "blip.visual_encoder.cls_token": vision_sd["embeddings.class_embedding"],
        "blip.visual_encoder.pos_embed": vision_sd["embeddings.position_embedding"],
        "blip.visual_encoder.patch_embed.proj.weight": vision_sd["embeddings.patch_embedding.weight"],
        "blip.visual_encoder.patch_embed.proj.bias": vision_sd["embeddings.patch_embedding.bias"],
        "blip.visual_encoder.norm.weight": vision_sd["post_layernorm.weight"],
        "blip.visual_encoder.norm.bias": vision_sd["post_layernorm.bias"],
        "blip.vision_proj.weight": torch.randn(8, 24),  # in the published file, unused for scoring
        "blip.vision_proj.bias": torch.randn(8),
        "blip.text_proj.weight": torch.randn(8, 32),
        "blip.text_proj.bias": torch.randn(8),
        "blip.text_encoder.embeddings.position_ids": torch.arange(40).unsqueeze(0),
    }
    names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
             "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, v in vision_sd.items():
        if k.startswith("encoder.layers."):
            _, _, n, rest = k.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            sd[f"blip.visual_encoder.blocks.{n}.{names[mod]}.{kind}"] = v
    sd.update({f"blip.text_encoder.{k}": v for k, v in text_sd.items()})
    sd.update({f"mlp.{k}": v for k, v in head_sd.items()})
    return {k: v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A reward folder laid out as the docs say, with tiny models in every published format."""
    from transformers import CLIPModel

    root = tmp_path_factory.mktemp("egrpo_rewards")
    clip = tiny_clip(seed=1)
    clip.save_pretrained(root / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    write_clip_tokenizer(root / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    tiny_clip(seed=2).save_pretrained(root / "PickScore_v1")  # like the HF repo: weights without tokenizer
    tiny_clip(seed=3).save_pretrained(root / "clip-vit-large-patch14")
    write_clip_tokenizer(root / "clip-vit-large-patch14")
    hps_model = tiny_clip(seed=4)
    torch.save({"state_dict": to_openclip(hps_model.state_dict()), "epoch": 3}, root / "HPS_v2.1_compressed.pt")
    torch.save(tiny_head(16, seed=5), root / "sac+logos+ava1-l14-linearMSE.pth")
    vision, text, med, vocab = tiny_blip(seed=6)
    ir_head = tiny_head(32, seed=7)
    (root / "ImageReward" / "bert-base-uncased").mkdir(parents=True)
    torch.save(to_imagereward(vision.state_dict(), text.state_dict(), ir_head), root / "ImageReward" / "ImageReward.pt")
    (root / "ImageReward" / "med_config.json").write_text(json.dumps(med))
    (root / "ImageReward" / "bert-base-uncased" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return dict(root=root, hps_model=hps_model, blip=(vision, text, ir_head), clip=clip,
                pick=CLIPModel.from_pretrained(str(root / "PickScore_v1")).eval())


def images(batch: int = 3, channels: int = 3, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, h, w, generator=torch.Generator().manual_seed(seed))


def build(name, files, **kw):
    return build_reward(name, reward_dir=str(files["root"]), device="cpu", **kw)


REWARDS = [("clip_score", {}), ("pickscore", {}), ("hpsv2", dict(vision_heads=2, text_heads=2)),
           ("imagereward", dict(vision_heads=2)), ("laion_aesthetic", {})]


# ---------------------------------------------------------------- every reward: protocol behaviour


@pytest.mark.parametrize("name,kw", REWARDS, ids=[r[0] for r in REWARDS])
def test_shapes_batching_determinism(files, name, kw):
    reward = build(name, files, **kw)
    assert reward.name == name
    x = images()
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    one_by_one = torch.cat([reward(x[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-5)
    assert torch.equal(reward(x, PROMPTS), scores)  # same call, same numbers
    micro = build(name, files, batch_size=2, **kw)
    torch.testing.assert_close(micro(x, PROMPTS), scores, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in reward.model.parameters())
    assert not reward.model.training


@pytest.mark.parametrize("name,kw", REWARDS, ids=[r[0] for r in REWARDS])
def test_gray_images_are_repeated_to_rgb(files, name, kw):
    reward = build(name, files, **kw)
    gray = images(2, channels=1)
    torch.testing.assert_close(reward(gray, PROMPTS[:2]), reward(gray.expand(-1, 3, -1, -1), PROMPTS[:2]))


def test_prompt_changes_text_rewards(files):
    x = images(1).expand(2, -1, -1, -1)
    for name, kw in REWARDS[:4]:
        s = build(name, files, **kw)(x, ["a red cat", "a blue dog on grass"])
        assert (s[0] - s[1]).abs() > 1e-6, name  # would fail if every prompt pooled the same token


def test_offload_moves_model_only_during_the_call(files):
    reward = build("pickscore", files, offload=True)
    moves = []
    original = reward.model.to

    def spy(*args, **kwargs):
        moves.append(str(args[0]) if args else str(kwargs))
        return original(*args, **kwargs)

    reward.model.to = spy
    seen = []
    score = reward.score
    reward.score = lambda im, pr: (seen.append(next(reward.model.parameters()).device.type), score(im, pr))[1]
    reward(images(), PROMPTS)
    assert moves == ["cpu", "cpu"] and seen == ["cpu"]  # to(device) before scoring, to("cpu") after
    assert next(reward.model.parameters()).device.type == "cpu"
    kept = build("pickscore", files, offload=False)
    kept.model.to = lambda *a, **k: pytest.fail("a model that is not offloaded must not move per call")
    kept(images(), PROMPTS)
    del kept.model.to  # back to nn.Module.to: Reward.to moves a kept model at once, an offloaded one later
    assert kept.to("cpu") is kept and kept.device == torch.device("cpu")
    assert reward.to("cpu") is reward and moves == ["cpu", "cpu"]


def test_dtype_option(files):
    ref = build("hpsv2", files, vision_heads=2, text_heads=2)(images(), PROMPTS)
    half = build("hpsv2", files, vision_heads=2, text_heads=2, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    out = half(images(), PROMPTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="unknown dtype"):
        build("hpsv2", files, vision_heads=2, text_heads=2, dtype="float8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(files):
    x = images()
    for name, kw in REWARDS:
        cpu = build(name, files, **kw)(x, PROMPTS)
        gpu = build_reward(name, reward_dir=str(files["root"]), device="cuda", **kw)
        torch.testing.assert_close(gpu(x.cuda(), PROMPTS), cpu, atol=1e-4, rtol=1e-4)
        off = build_reward(name, reward_dir=str(files["root"]), device="cuda", offload=True, **kw)
        torch.testing.assert_close(off(x, PROMPTS), cpu, atol=1e-4, rtol=1e-4)
        assert next(off.model.parameters()).device.type == "cpu"


def test_prompt_count_must_match(files):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        build("clip_score", files)(images(), PROMPTS[:2])


def test_weighted_combination_of_model_rewards(files):
    hps = build("hpsv2", files, vision_heads=2, text_heads=2)
    clip = build("clip_score", files)
    combo = WeightedRewards([hps, clip], [1.0, 0.5])
    parts = combo.components(images(), PROMPTS)
    assert set(parts) == {"hpsv2", "clip_score"}
    torch.testing.assert_close(combo(images(), PROMPTS), parts["hpsv2"] + 0.5 * parts["clip_score"])


# ---------------------------------------------------------------- what each reward computes


def manual_clip_cosine(model, x, prompts, tokenizer, fit):
    px = preprocess(x, 32, fit)
    ids = tokenizer(prompts, 16)
    with torch.no_grad():
        i = model.get_image_features(pixel_values=px).pooler_output
        t = model.get_text_features(input_ids=ids).pooler_output
    return torch.nn.functional.cosine_similarity(i, t, dim=-1)


def test_pickscore_is_logit_scale_times_cosine(files):
    tok = ClipTokenizer(files["root"] / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    want = files["pick"].logit_scale.exp() * manual_clip_cosine(files["pick"], images(), PROMPTS, tok, "crop")
    torch.testing.assert_close(build("pickscore", files)(images(), PROMPTS), want, atol=1e-5, rtol=1e-5)


def test_clip_score_scale(files):
    tok = ClipTokenizer(files["root"] / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    want = manual_clip_cosine(files["clip"], images(), PROMPTS, tok, "crop")
    torch.testing.assert_close(build("clip_score", files)(images(), PROMPTS), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(build("clip_score", files, scale=100.0)(images(), PROMPTS), 100 * want,
                               atol=1e-3, rtol=1e-5)


def test_hps_through_registry_matches_the_source_model(files):
    """build_reward("hpsv2", path=...) on an open_clip-format .pt gives the cosine of the model it came from."""
    reward = build_reward("hpsv2", path=str(files["root"] / "HPS_v2.1_compressed.pt"),
                          tokenizer=str(files["root"] / "clip-vit-large-patch14"), vision_heads=2, text_heads=2,
                          device="cpu")
    tok = ClipTokenizer(files["root"] / "clip-vit-large-patch14")
    want = manual_clip_cosine(files["hps_model"], images(), PROMPTS, tok, "pad")
    torch.testing.assert_close(reward(images(), PROMPTS), want, atol=1e-5, rtol=1e-5)


def test_clip_score_loads_open_clip_checkpoints(files, tmp_path):
    torch.save(to_openclip(files["clip"].state_dict()), tmp_path / "open_clip_pytorch_model.bin")
    from_oc = build_reward("clip_score", path=str(tmp_path / "open_clip_pytorch_model.bin"), vision_heads=2,
                           text_heads=2, tokenizer=str(files["root"] / "clip-vit-large-patch14"), device="cpu")
    torch.testing.assert_close(from_oc(images(), PROMPTS), build("clip_score", files)(images(), PROMPTS),
                               atol=1e-5, rtol=1e-5)


def test_imagereward_matches_its_parts(files):
    from egrpo_backend.rewards.models.imagereward import MEAN, STD, load_bert_tokenizer

    vision, text, head = files["blip"]
    tok = load_bert_tokenizer(files["root"] / "ImageReward" / "bert-base-uncased")
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == 2 and enc["input_ids"].shape == (3, 35)  # [CLS] first
    with torch.no_grad():
        img = vision(pixel_values=preprocess(images(), 32, "crop")).last_hidden_state
        cls = text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], encoder_hidden_states=img,
                   encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        x = cls
        for i in (0, 2, 4, 6, 7):
            x = x @ head[f"layers.{i}.weight"].t() + head[f"layers.{i}.bias"]
    want = (x.squeeze(-1) - MEAN) / STD
    torch.testing.assert_close(build("imagereward", files, vision_heads=2)(images(), PROMPTS), want,
                               atol=1e-5, rtol=1e-5)


def test_aesthetic_is_head_of_normalised_embedding(files):
    from transformers import CLIPVisionModelWithProjection

    vis = CLIPVisionModelWithProjection.from_pretrained(str(files["root"] / "clip-vit-large-patch14")).eval()
    head = torch.load(files["root"] / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    with torch.no_grad():
        x = torch.nn.functional.normalize(vis(pixel_values=preprocess(images(), 32, "crop")).image_embeds, dim=-1)
        for i in (0, 2, 4, 6, 7):
            x = x @ head[f"layers.{i}.weight"].t() + head[f"layers.{i}.bias"]
    reward = build("laion_aesthetic", files)
    torch.testing.assert_close(reward(images(), ["ignored"] * 3), x.squeeze(-1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- conversions: every key, both ways


def test_openclip_conversion_maps_every_key(files):
    from transformers import CLIPModel

    hf_sd = files["hps_model"].state_dict()
    oc = to_openclip(hf_sd)
    converted = openclip_to_transformers(oc)
    assert set(converted) == set(hf_sd)  # none missing, none left over
    for k in hf_sd:
        assert torch.equal(converted[k], hf_sd[k]), k
    # every open_clip key was used: each gives one weight, except in_proj_* which give q, k and v
    n_split = sum(1 for k in oc if ".attn.in_proj_" in k)
    assert len(converted) == len(oc) + 2 * n_split
    # a strict load into a fresh model of the inferred config has nothing missing or unexpected
    from egrpo_backend.rewards.models.openclip_convert import openclip_config

    cfg = openclip_config(oc, vision_heads=2, text_heads=2, eos_token_id=files["hps_model"].config.text_config.eos_token_id)
    CLIPModel(cfg).load_state_dict(converted, strict=True)
    with pytest.raises(ValueError, match="no transformers counterpart"):
        openclip_to_transformers({**oc, "visual.attn_pool.query": torch.zeros(2)})


def test_imagereward_conversion_maps_every_key(files):
    from egrpo_backend.rewards.models.blip_convert import split_imagereward

    vision, text, head = files["blip"]
    sd = to_imagereward(vision.state_dict(), text.state_dict(), head)
    parts = split_imagereward(sd)
    assert set(parts["vision"]) == set(vision.state_dict())
    assert set(parts["text"]) == set(text.state_dict())
    assert set(parts["head"]) == set(head)
    n_used = len(parts["vision"]) + len(parts["text"]) + len(parts["head"])
    assert len(sd) - n_used == 5  # vision_proj/text_proj weight+bias and position_ids are dropped on purpose
    with pytest.raises(ValueError, match="no place"):
        split_imagereward({**sd, "blip.itm_head.weight": torch.zeros(2, 2)})


# ---------------------------------------------------------------- safe loading and conversion


class NotATensor:  # pickled by reference: weights_only=True must refuse it
    pass


def test_unsafe_pickle_is_refused(tmp_path, files):
    bad = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": to_openclip(files["hps_model"].state_dict()), "extra": NotATensor()}, bad)
    with pytest.raises(UnsafeCheckpointError, match="cannot be loaded safely"):
        load_state_dict(bad)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        build_reward("hpsv2", path=str(bad), tokenizer=str(files["root"] / "clip-vit-large-patch14"), device="cpu")


def test_convert_to_safetensors_round_trip(tmp_path, files):
    import shutil

    src = tmp_path / "HPS_v2.1_compressed.pt"
    shutil.copy(files["root"] / "HPS_v2.1_compressed.pt", src)
    dst = convert_to_safetensors(src)
    assert dst == tmp_path / "HPS_v2.1_compressed.safetensors" and dst.is_file()
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no leftovers
    a, b = load_state_dict(src), load_state_dict(dst)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the reward folder search prefers the .safetensors; it scores like the .pt
    write_clip_tokenizer(tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    src.unlink()
    reward = build_reward("hpsv2", reward_dir=str(tmp_path), vision_heads=2, text_heads=2, device="cpu")
    torch.testing.assert_close(reward(images(), PROMPTS),
                               build("hpsv2", files, vision_heads=2, text_heads=2)(images(), PROMPTS))


# ---------------------------------------------------------------- finding files, and saying what is missing


def test_missing_file_error_names_files_folder_and_source(tmp_path):
    with pytest.raises(RewardFileNotFound) as e:
        build_reward("hpsv2", reward_dir=str(tmp_path), device="cpu")
    msg = str(e.value)
    assert "HPS_v2.1_compressed.pt" in msg and str(tmp_path) in msg and "xswu/HPSv2" in msg
    with pytest.raises(RewardFileNotFound, match="THUDM/ImageReward"):
        build_reward("imagereward", reward_dir=str(tmp_path), device="cpu")
    with pytest.raises(RewardFileNotFound, match="yuvalkirstain/PickScore_v1"):
        build_reward("pickscore", reward_dir=str(tmp_path), device="cpu")
    with pytest.raises(RewardFileNotFound, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        build_reward("laion_aesthetic", reward_dir=str(tmp_path), device="cpu")
    with pytest.raises(RewardFileNotFound, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        build_reward("clip_score", reward_dir=str(tmp_path), device="cpu")


def test_missing_folder_and_tokenizer_messages(tmp_path, monkeypatch, files):
    monkeypatch.delenv("EGRPO_REWARD_DIR", raising=False)
    with pytest.raises(RewardFileNotFound, match="no reward folder was given.*EGRPO_REWARD_DIR"):
        build_reward("hpsv2", device="cpu")
    with pytest.raises(RewardFileNotFound, match="does not exist"):
        build_reward("hpsv2", path=str(tmp_path / "nope.pt"), device="cpu")
    with pytest.raises(RewardFileNotFound, match="open_clip checkpoints do not contain it"):
        build_reward("hpsv2", path=str(files["root"] / "HPS_v2.1_compressed.pt"), reward_dir=str(tmp_path),
                     device="cpu")


def test_env_var_reward_dir(files, monkeypatch):
    monkeypatch.setenv("EGRPO_REWARD_DIR", str(files["root"]))
    assert build_reward("hpsv2", vision_heads=2, text_heads=2, device="cpu").name == "hpsv2"


def test_unknown_option_and_version():
    with pytest.raises(ValueError, match="bad options for reward 'pickscore'"):
        build_reward("pickscore", colour="red")
    with pytest.raises(ValueError, match="unknown HPS version 'v3'"):
        build_reward("hpsv2", version="v3")


def test_reward_status(files, tmp_path):
    from egrpo_backend.rewards import reward_names

    rows = {r["name"]: r for r in reward_status(str(files["root"]))}
    assert set(rows) == {"clip_score", "pickscore", "hpsv2", "imagereward", "laion_aesthetic"}
    assert set(rows) <= set(reward_names())  # the CLI matches them to the registry by name
    for name, row in rows.items():
        assert row["found"] and row["searched"] == str(files["root"]) and row["hint"] == "", row
        assert all(str(files["root"]) in f for f in row["files"])
    (tmp_path / "HPS_v2_compressed.pt").write_bytes(b"")  # an optional file is listed when present
    hps = {r["name"]: r for r in reward_status(str(tmp_path))}["hpsv2"]
    assert not hps["found"] and "HPS_v2.1_compressed.pt" in hps["files"][0] and "xswu/HPSv2" in hps["hint"]
    both = {r["name"]: r for r in reward_status([str(files["root"]), str(tmp_path)])}["hpsv2"]
    assert both["found"] and any('HPS_v2_compressed.pt (checkpoint for version="v2.0")' in f for f in both["files"])
    assert not any(r["found"] for r in reward_status(str(tmp_path / "nowhere")))


def test_importing_the_package_is_cheap():
    import subprocess
    import sys

    code = "import sys, egrpo_backend.rewards as r; r.reward_names(); print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- tokenizer and preprocessing


def test_clip_tokenizer_folder_and_bpe_gz_agree(tmp_path):
    folder = ClipTokenizer(write_clip_tokenizer(tmp_path / "tok"))
    lines = ["bpe_simple_vocab_16e6.txt#version: 0.2"] + [" ".join(m) for m in MERGES]
    with gzip.open(tmp_path / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    gz = ClipTokenizer(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    prompts = ["a red cat", "A  RED   dog!", "&amp; caf\u00e9", "x" * 40]
    ids = folder(prompts, 16)
    assert torch.equal(ids, gz(prompts, 16))
    vocab, _ = tiny_clip_vocab()
    assert ids[0, :4].tolist() == [folder.bos_token_id, vocab["a</w>"], vocab["red</w>"], vocab["cat</w>"]]
    assert ids[0, 4].item() == folder.eos_token_id
    assert ids[3, -1].item() == folder.eos_token_id  # truncation keeps EOS last
    assert torch.equal(folder(["&amp;"], 16), folder(["&"], 16))  # HTML entities are unescaped, like open_clip


def test_resize_crop_and_pad_match_torchvision_rules():
    x = torch.rand(2, 3, 40, 60)
    assert resize_crop(x, 32).shape == (2, 3, 32, 32)
    same = torch.rand(1, 3, 32, 32)
    assert torch.equal(resize_crop(same, 32), same)  # no resampling at the target size
    padded = resize_pad(x, 32)  # 40x60 -> 21x32 (round(40*32/60)), padded 5 above and 6 below
    assert padded.shape == (2, 3, 32, 32)
    assert padded[:, :, :5].abs().sum() == 0 and padded[:, :, -6:].abs().sum() == 0
    assert padded[:, :, 5:26].abs().sum() > 0
    gray = preprocess(torch.rand(1, 1, 32, 32), 32)
    assert gray.shape == (1, 3, 32, 32)
    ones = normalize(torch.ones(1, 3, 1, 1)).flatten()
    torch.testing.assert_close(ones, torch.tensor([(1 - 0.48145466) / 0.26862954, (1 - 0.4578275) / 0.26130258,
                                                   (1 - 0.40821073) / 0.27577711]))
    with pytest.raises(ValueError, match="1- or 3-channel"):
        preprocess(torch.rand(1, 4, 8, 8), 8)


# ---------------------------------------------------------------- a model reward inside a job spec


def test_model_reward_in_a_job_spec_with_per_reward_advantages(files, tmp_path):
    """A real job (embedded default model) trains on digit_probability + hpsv2 from a reward folder,
    each reward normalised within its groups (reward_mode per_reward)."""
    import json as _json

    from egrpo_backend.jobs.run import create_job, run_job

    spec = {
        "model": {"source": "default"}, "prompts": ["a handwritten digit two"],
        "rewards": [{"name": "digit_probability", "weight": 1.0},
                    {"name": "hpsv2", "weight": 0.5, "reward_dir": str(files["root"]), "vision_heads": 2, "text_heads": 2}],
        "algorithm": {"steps": 4, "active": "0-1", "group_size": 2, "clip_range": 0.2, "reward_mode": "per_reward"},
        "lora": {"rank": 2, "alpha": 2.0},
        "train": {"iterations": 1, "prompts_per_iteration": 1, "evaluate": False, "device": "cpu"},
        "output": {"name": "two"},
    }
    job = create_job(spec, tmp_path / "job")
    result = run_job(job, progress=False)
    assert result["status"] == "finished"
    m = _json.loads((job / "metrics.json").read_text())["train"][0]
    assert {"reward/digit_probability", "reward/hpsv2"} <= set(m)
    assert _json.loads((job / "job.json").read_text())["rewards"][1]["name"] == "hpsv2"
