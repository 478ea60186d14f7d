"""The Reward protocol's built-ins: DDPO's JPEG rewards and the weighted combination."""

import pytest
import torch

from egrpo_backend.rewards import Reward, WeightedRewards, build_reward


def images():
    torch.manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32)
    return torch.cat([flat, noisy])


def test_jpeg_compressibility_prefers_simple_images():
    imgs = images()
    comp = build_reward("jpeg_compressibility")(imgs, ["a", "b"])
    incomp = build_reward("jpeg_incompressibility")(imgs, ["a", "b"])
    assert comp.dtype == torch.float32 and comp.shape == (2,)
    assert comp[0] > comp[1]  # the flat image compresses better
    torch.testing.assert_close(incomp, -comp)
    assert isinstance(build_reward("jpeg_compressibility"), Reward)


def test_jpeg_on_gray_images_and_determinism():
    gray = images().mean(1, keepdim=True)
    r = build_reward("jpeg_compressibility")
    torch.testing.assert_close(r(gray, ["a", "b"]), r(gray, ["a", "b"]))


def test_weighted_combination_and_components():
    imgs = images()
    a, b = build_reward("jpeg_compressibility"), build_reward("jpeg_incompressibility")
    combo = WeightedRewards([a, b], [2.0, 0.5])
    comps = combo.components(imgs, ["x", "y"])
    assert set(comps) == {"jpeg_compressibility", "jpeg_incompressibility"}
    torch.testing.assert_close(combo(imgs, ["x", "y"]), 2.0 * comps["jpeg_compressibility"] + 0.5 * comps["jpeg_incompressibility"])
    assert combo.name == "2*jpeg_compressibility+0.5*jpeg_incompressibility"


def test_combination_errors():
    a = build_reward("jpeg_compressibility")
    with pytest.raises(ValueError, match="no rewards"):
        WeightedRewards([], [])
    with pytest.raises(ValueError, match="listed twice"):
        WeightedRewards([a, a], [1, 1])
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        WeightedRewards([a, build_reward("jpeg_incompressibility")], [1])
