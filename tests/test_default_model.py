"""The embedded digits model: weights, text encoder, prompts, classifier reward, evaluation, metrics.

Fast (tiny counts); offline (HF_HUB_OFFLINE=1); the classifier is built in a temporary cache dir.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

import pytest
import torch

from egrpo_backend.default_model import classifier as classifier_mod
from egrpo_backend.default_model import digits as digits_mod
from egrpo_backend.default_model.digits import (
    HELDOUT_SEED_BASE,
    digit_of_prompt,
    heldout_eval_set,
    prompt_for,
    real_digits,
    train_prompts,
)
from egrpo_backend.default_model.evaluate import bootstrap_ci, heldout_reward
from egrpo_backend.default_model.metrics import nearest_real_distance, within_prompt_diversity


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The build machines are small and shared: one thread trains the classifier fastest there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder():
    from egrpo_backend.default_model.text import get_text_encoder

    return get_text_encoder()


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """One classifier build per test module, in a temporary EGRPO_CACHE."""
    path = tmp_path_factory.mktemp("egrpo_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("EGRPO_CACHE", str(path))
    classifier_mod._LOADED.clear()
    yield path
    classifier_mod._LOADED.clear()
    mp.undo()


@pytest.fixture(scope="module")
def reward(classifier_cache):
    from egrpo_backend.rewards import build_reward

    return build_reward("digit_probability")


# --- weights -----------------------------------------------------------------------------------------


def test_committed_weights_give_finite_velocities(encoder):
    from egrpo_backend.default_model.model import load_default_transformer, velocity

    transformer = load_default_transformer()
    assert sum(p.numel() for p in transformer.parameters()) < 1_000_000
    x = torch.randn(3, 1, 16, 16)
    cond = encoder.encode(["a handwritten digit three", "digit: seven", ""])
    v = velocity(transformer, x, torch.tensor([1.0, 0.5, 0.1]), cond)
    assert v.shape == (3, 1, 16, 16)
    assert torch.isfinite(v).all()


def test_missing_weights_error_names_the_file(tmp_path):
    from egrpo_backend.default_model.model import load_transformer

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_transformer(tmp_path)


# --- text encoder ------------------------------------------------------------------------------------


def test_text_encoder_shapes_and_determinism(encoder):
    prompts = ["a handwritten digit three", "digit: seven"]
    a = encoder.encode(prompts)
    assert set(a) == {"encoder_hidden_states", "pooled_projections"}
    assert a["encoder_hidden_states"].shape == (2, 16, 384) and a["encoder_hidden_states"].dtype == torch.float32
    assert a["pooled_projections"].shape == (2, 384)
    assert torch.allclose(a["pooled_projections"].norm(dim=1), torch.ones(2), atol=1e-5)
    # Padding rows are zero: 'digit: seven' is [CLS] digit : seven [SEP] = 5 tokens.
    assert a["encoder_hidden_states"][1, 5:].abs().sum() == 0
    # Same result uncached and in another batch composition.
    encoder._cache.clear()
    b = encoder.encode(["digit: seven", "", "a handwritten digit three"])
    assert torch.equal(a["pooled_projections"][0], b["pooled_projections"][2])
    assert torch.equal(a["encoder_hidden_states"][1], b["encoder_hidden_states"][0])


def test_different_digits_give_different_embeddings(encoder):
    e = encoder.encode([prompt_for(3), prompt_for(7)])
    assert not torch.allclose(e["pooled_projections"][0], e["pooled_projections"][1], atol=1e-3)


# --- prompts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, digit",
    [("a handwritten digit three", 3), ("the number 7 written by hand", 7), ("Digit: ZERO", 0), ("nine.", 9)],
)
def test_digit_of_prompt(prompt, digit):
    assert digit_of_prompt(prompt) == digit


@pytest.mark.parametrize("prompt", ["", "a handwritten digit", "three or seven", "the number 42"])
def test_digit_of_prompt_rejects_none_or_several(prompt):
    with pytest.raises(ValueError, match="names"):
        digit_of_prompt(prompt)


def test_prompt_sets():
    assert len(train_prompts()) == 50 and len(set(train_prompts())) == 50
    pairs = heldout_eval_set()
    assert len(pairs) == 200 and len(set(pairs)) == 200
    assert all(seed >= HELDOUT_SEED_BASE for _, seed in pairs)  # training never uses these seeds
    assert sorted(digit_of_prompt(p) for p, _ in pairs) == sorted(list(range(10)) * 20)


def test_real_digit_splits_are_disjoint_and_scaled():
    xt, yt = real_digits("train")
    xh, yh = real_digits("heldout")
    assert xt.shape[1:] == (1, 16, 16) and xt.min() >= 0 and xt.max() <= 1
    assert xt.shape[0] + xh.shape[0] == 1797
    assert set(yh.tolist()) == set(range(10))
    train_idx, held_idx = digits_mod._split_indices()
    assert not set(train_idx.tolist()) & set(held_idx.tolist())  # no real image is in both splits


# --- classifier and reward ---------------------------------------------------------------------------


def test_classifier_accuracy_and_cache(classifier_cache):
    model = classifier_mod.get_classifier()
    assert classifier_mod.accuracy(model, "heldout") > 0.9
    files = list(classifier_cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(classifier_cache.glob("*.tmp"))


def test_corrupt_or_stale_cache_is_rejected(tmp_path, classifier_cache):
    classifier_mod.get_classifier()
    good = next(classifier_cache.glob("*.safetensors"))
    assert classifier_mod._try_load(good, classifier_mod.TRAIN_CONFIG) is not None
    truncated = tmp_path / good.name
    truncated.write_bytes(good.read_bytes()[:1000])  # a half-written or damaged file
    assert classifier_mod._try_load(truncated, classifier_mod.TRAIN_CONFIG) is None
    other = dict(classifier_mod.TRAIN_CONFIG, epochs=1)  # a file from another recipe is not reused
    assert classifier_mod._try_load(good, other) is None


def test_reward_prefers_the_named_digit(reward):
    x, y = real_digits("heldout")
    three = x[(y == 3).nonzero()[0]]  # [1, 1, 16, 16]
    scores = reward(three.repeat(2, 1, 1, 1), [prompt_for(3), prompt_for(7)])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert scores[0] > 0.5 > scores[1]
    assert reward.name == "digit_probability"


def test_reward_accepts_rgb_and_other_sizes(reward):
    x, y = real_digits("heldout")
    img = x[(y == 5).nonzero()[0]]
    rgb32 = torch.nn.functional.interpolate(img, size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1)
    assert reward(rgb32, [prompt_for(5)])[0] > 0.5


# --- evaluation --------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_the_mean():
    v = torch.rand(50, generator=torch.Generator().manual_seed(0))
    lo, hi = bootstrap_ci(v, n_boot=500)
    assert lo <= float(v.mean()) <= hi
    assert bootstrap_ci(v, n_boot=500) == (lo, hi)  # seeded


def test_heldout_reward_with_a_fake_sampler(reward):
    # A "sampler" that returns the first real held-out image of the named digit: reward is high.
    x, y = real_digits("heldout")
    firsts = {d: x[(y == d).nonzero()[0, 0]] for d in range(10)}

    def sample_fn(prompts, seeds):
        return torch.stack([firsts[digit_of_prompt(p)] for p in prompts])

    eval_set = heldout_eval_set()[::20]  # one pair per digit
    out = heldout_reward(sample_fn, reward, n_boot=200, eval_set=eval_set)
    assert len(out["per_sample"]) == 10
    assert out["ci"][0] <= out["mean"] <= out["ci"][1]
    assert out["mean"] > 0.8


def test_ode_sampler_is_seeded(encoder):
    from egrpo_backend.default_model.model import load_default_transformer
    from egrpo_backend.default_model.sampling import make_sample_fn

    sample = make_sample_fn(load_default_transformer(), encoder, steps=4)
    a = sample([prompt_for(1), prompt_for(2)], [10_000, 10_001])
    b = sample([prompt_for(2)], [10_001])  # alone: same image as in the batch
    assert a.shape == (2, 1, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.allclose(a[1], b[0], atol=1e-5)


# --- metrics -----------------------------------------------------------------------------------------


def test_diversity_of_identical_images_is_zero():
    img = torch.rand(1, 1, 16, 16)
    assert within_prompt_diversity(img.repeat(4, 1, 1, 1), [0, 0, 1, 1]) == 0.0


def test_diversity_hand_computed():
    a, b = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    b[..., 0, :4] = 1.0  # 4 pixels differ by 1 -> L2 distance 2
    images = torch.cat([a, b, a, a])
    # group 0: one pair at distance 2; group 1: one pair at distance 0 -> mean 1
    assert within_prompt_diversity(images, [0, 0, 1, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two samples"):
        within_prompt_diversity(images[:2], [0, 1])


def test_nearest_real_distance():
    x, _ = real_digits("heldout")
    assert nearest_real_distance(x[:5]) == pytest.approx(0.0, abs=1e-9)  # they are the real set
    assert nearest_real_distance(torch.zeros(2, 1, 16, 16)) > 0.5
