"""Imputation baselines on synthetic latents whose answer is known."""

import pytest
import torch

from mvld.train.baselines import MeanLatent, NearestNeighbour, RidgeRegressor

VIEWS, DIM = 3, 4


def linear_latents(count: int, seed: int) -> torch.Tensor:
    """View 0 is random; views 1 and 2 are fixed affine maps of it (an exact linear relation)."""
    gen = torch.Generator().manual_seed(99)
    maps = torch.randn(2, DIM, DIM, generator=gen)
    offsets = torch.randn(2, DIM, generator=gen)
    x0 = torch.randn(count, DIM, generator=torch.Generator().manual_seed(seed))
    return torch.stack([x0, x0 @ maps[0] + offsets[0], x0 @ maps[1] + offsets[1]], 1)


def masks(count: int, mask: list[bool]) -> torch.Tensor:
    return torch.tensor(mask).expand(count, -1).clone()


def blank_missing(z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Missing views set to NaN: a baseline must never read them."""
    return torch.where(present[..., None], z, torch.full_like(z, float("nan")))


@pytest.mark.parametrize("mask", [[True, False, False], [True, True, False], [False, True, True]])
def test_ridge_regressor_recovers_a_linear_relation(mask):
    train, test = linear_latents(400, seed=0), linear_latents(50, seed=1)
    present = masks(len(test), mask)
    imputed = RidgeRegressor(train, alpha=1e-6)(blank_missing(test, present), present)
    torch.testing.assert_close(imputed, test, atol=1e-4, rtol=1e-4)


def test_ridge_regressor_cannot_invent_an_unrelated_view():
    train, test = torch.randn(400, VIEWS, DIM), torch.randn(50, VIEWS, DIM)
    present = masks(len(test), [True, True, False])
    imputed = RidgeRegressor(train)(test, present)
    error = (imputed[:, 2] - test[:, 2]).pow(2).mean()
    assert error > 0.8  # independent views: the best linear guess is about the mean


def test_nearest_neighbour_finds_the_exact_neighbour_on_observed_views_only():
    train = torch.randn(300, VIEWS, DIM, generator=torch.Generator().manual_seed(0))
    picks = torch.tensor([5, 17, 250, 299])
    query = train[picks] + 1e-3 * torch.randn(len(picks), VIEWS, DIM)
    query[:, 2] = 1e6  # the missing view is garbage: it must not enter the distance
    present = masks(len(picks), [True, True, False])
    nearest = NearestNeighbour(train, chunk=2)
    assert nearest.neighbours(query, present).tolist() == picks.tolist()
    imputed = nearest(query, present)
    torch.testing.assert_close(imputed[:, 2], train[picks, 2])
    torch.testing.assert_close(imputed[:, :2], query[:, :2])


def test_mean_latent_fills_the_training_mean_and_keeps_observed_views_bit_for_bit():
    train = torch.randn(100, VIEWS, DIM) * 3 + 1
    test = torch.randn(7, VIEWS, DIM)
    present = torch.tensor([[True, False, True]] * 4 + [[False, False, True]] * 3)
    imputed = MeanLatent(train)(test, present)
    assert torch.equal(imputed[present], test[present])
    expected = train.double().mean(0).float().expand_as(test)
    torch.testing.assert_close(imputed[~present], expected[~present])


def test_every_baseline_leaves_complete_frame_sets_alone():
    train, test = linear_latents(50, 0), linear_latents(3, 1)
    present = torch.ones(3, VIEWS, dtype=torch.bool)
    for baseline in (MeanLatent(train), NearestNeighbour(train), RidgeRegressor(train)):
        assert torch.equal(baseline(test, present), test)


def test_too_few_training_latents_are_refused():
    with pytest.raises(ValueError, match="N >= 2"):
        NearestNeighbour(torch.zeros(1, VIEWS, DIM))
