"""The memory prior: a failed camera's regression estimate corrected by its own last latent,
blended over age anchors, fitted in closed form on scenes, served by the ridge imputer."""

import numpy as np
import pytest
import torch
from model_fixtures import TINY_GRID, tiny_conv_net

from mvld.common.dataset import Scenes
from mvld.model.checkpoint import LatentStats
from mvld.model.memory_prior import MEMORY_ANCHORS_S, MemoryPrior, anchor_weights
from mvld.model.score_net import RegressionPrior
from mvld.receiver.ridge_imputer import RidgeImputer
from mvld.train.baselines import RidgeRegressor
from mvld.train.memory import SceneMemory
from mvld.train.memory_prior import fit_memory_prior, memory_prior_errors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = TINY_GRID
DIM = 32
VIEWS = 3


def test_anchor_weights_blend_neighbouring_ages_smoothly() -> None:
    ages = torch.tensor([0.01, MEMORY_ANCHORS_S[1], 1.0, 100.0, float("inf")])
    weights = anchor_weights(ages)
    assert torch.allclose(weights[:4].sum(1), torch.ones(4))
    assert weights[0, 0] == 1 and weights[1, 1] == 1 and weights[3, -1] == 1, "clamped ends"
    assert (weights[2, 1:3] > 0).all() and weights[2].count_nonzero() == 2, "between 0.5 and 2"
    assert (weights[4] == 0).all(), "no memory: no anchor"
    fine = anchor_weights(torch.logspace(-1, 1.5, 3000))
    assert (fine.diff(dim=0).abs().max() < 0.01).item(), "no jump while an outage grows"


def test_an_unfitted_memory_prior_changes_nothing() -> None:
    blend = MemoryPrior(VIEWS, SHAPE)
    assert not blend.fitted
    estimate, memory = torch.randn(5, VIEWS, DIM), torch.randn(5, VIEWS, DIM)
    observed = torch.tensor([[True, False, False]] * 5)
    age = torch.tensor([[0.1, 2.0, float("inf")]] * 5)
    assert torch.equal(blend(estimate, observed, memory, age), estimate)


def _static_scenes(
    seed: int, frames: int = 600, per_scene: int = 30
) -> tuple[torch.Tensor, Scenes]:
    """Scenes of still cameras (each view the same within a scene, up to a little noise) that
    are independent of each other: the other cameras say nothing of a view, its memory all."""
    generator = torch.Generator().manual_seed(seed)
    scenes = frames // per_scene
    still = torch.randn(scenes, VIEWS, DIM, generator=generator).repeat_interleave(per_scene, 0)
    z = still + 0.05 * torch.randn(frames, VIEWS, DIM, generator=generator)
    return z, Scenes(10.0, np.repeat(np.arange(scenes), per_scene))


def _fitted(alpha: float = 1e-3) -> tuple[RegressionPrior, MemoryPrior, dict]:
    """A regression prior fitted on some scenes, a memory prior on others."""
    prior = RegressionPrior(VIEWS, DIM)
    ridge = RidgeRegressor(_static_scenes(seed=1)[0], alpha=1.0)
    fits = {mask: ridge.fit(mask) for mask in prior.patterns}
    prior.load_fits(fits)
    z, scenes = _static_scenes(seed=0)
    present = torch.ones(len(z), VIEWS, dtype=torch.bool)
    blend = MemoryPrior(VIEWS, SHAPE)
    bank = SceneMemory(z, present, scenes, drop=0.0, max_age_s=5.0)
    fit_memory_prior(blend, prior, z, torch.arange(len(z)), bank, alpha=alpha)
    return prior, blend, fits


def test_a_fitted_memory_prior_restores_a_still_camera_from_its_memory() -> None:
    prior, blend, _ = _fitted()
    assert blend.fitted
    z, scenes = _static_scenes(seed=2)  # scenes neither fit saw
    present = torch.ones(len(z), VIEWS, dtype=torch.bool)
    bank = SceneMemory(z, present, scenes, drop=0.0, max_age_s=5.0)
    errors = memory_prior_errors(blend, prior, z, torch.arange(len(z)), bank)
    assert errors["regression"] > 0.5, "the other cameras say nothing of a view"
    assert errors["memory prior"] < 0.05 * errors["regression"]

    observed = torch.tensor([[True, True, False]] * len(z))
    age = torch.full((len(z), VIEWS), 1.0)
    memory = z.roll(1, 0)  # the frame before: the same still view within a scene
    restored = blend(prior(z, observed), observed, memory, age)
    inside = torch.from_numpy(scenes.position() > 0)
    error = ((restored[inside, 2] - z[inside, 2]) ** 2).mean()
    assert error < 0.02, f"a still camera comes back from its memory: MSE {error:.3f}"
    assert torch.equal(restored[:, :2], z[:, :2]), "observed views are never touched"


def test_the_ridge_imputer_corrects_failed_cameras_with_their_memory() -> None:
    _, blend, fits = _fitted()
    z, _ = _static_scenes(seed=2)
    stats = LatentStats(mean=torch.full((VIEWS, DIM), 3.0), std=torch.full((VIEWS, DIM), 2.0))
    imputer = RidgeImputer(fits, stats, memory_prior=blend)
    assert imputer.uses_memory
    rows = torch.arange(1, 30)  # one scene, after its first frame
    raw = stats.destandardise(z[rows])
    failed = torch.tensor([[True, True, False]] * len(rows))
    with_memory = imputer(
        raw,
        failed,
        memory=stats.destandardise(z[rows - 1]),
        memory_age=torch.full((len(rows), VIEWS), 0.1),
    ).latents
    without = imputer(raw, failed).latents
    truth = raw[:, 2]
    assert ((with_memory[:, 2] - truth) ** 2).mean() < 0.1 * ((without[:, 2] - truth) ** 2).mean()
    assert torch.equal(with_memory[:, :2], raw[:, :2])


def test_a_video_aware_prior_network_has_a_memory_prior_that_starts_as_identity() -> None:
    plain, aware = tiny_conv_net(prior=True), tiny_conv_net(memory=True, prior=True)
    assert plain.memory_prior is None and aware.memory_prior is not None
    missing, unexpected = aware.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and "memory_prior.maps" in missing
    x, tau = torch.randn(4, VIEWS, DIM), torch.tensor([[0.0, 0.5, 0.5]] * 4)
    memory, age = torch.randn(4, VIEWS, DIM), torch.tensor([[0.1, 1.0, 3.0]] * 4)
    torch.nn.init.normal_(aware.output.weight, std=0.1)
    aware_out = aware(x, tau, memory, age)
    assert torch.allclose(aware_out, aware(x, tau), atol=1e-6), "identity maps, zero layers"
    maps = aware.memory_prior.maps.clone()
    maps[..., -1] = 1.0  # a fitted blend that moves every estimate
    aware.memory_prior.load_maps(maps)
    assert not torch.allclose(aware(x, tau, memory, age), aware_out, atol=1e-4)
