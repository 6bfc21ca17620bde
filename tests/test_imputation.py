"""The imputation API: known answer through (de)standardisation, contract checks on a ScoreNet."""

import pytest
import torch
from gaussian_reference import CLEAN, GaussianEps, GaussianMoments, gaussian_problem
from gaussian_reference import moment_errors as whitened_errors

from mvld.common.errors import ConfigError
from mvld.common.preprocess import PreprocessConfig
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.checkpoint import LatentStats, MVLDModel
from mvld.model.score_net import ScoreNet, ScoreNetConfig
from mvld.model.sde import VPSDE
from mvld.receiver.imputation import Imputation, Imputer, Provenance

VIEWS, DIM = 3, 8
SDE = VPSDE()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_stats(views: int, dim: int, seed: int = 0) -> LatentStats:
    gen = torch.Generator().manual_seed(seed)
    return LatentStats(
        mean=torch.randn(views, dim, generator=gen) * 3,
        std=torch.rand(views, dim, generator=gen) * 2 + 0.5,
    )


@pytest.fixture(scope="module")
def model() -> MVLDModel:
    """A tiny complete model with a randomly initialised score network (non-zero output)."""
    torch.manual_seed(0)
    score_net = ScoreNet(
        ScoreNetConfig(num_views=VIEWS, latent_dim=DIM, widths=(32, 16), time_dim=16)
    )
    torch.nn.init.normal_(score_net.output.weight, std=0.1)  # zero-initialised otherwise
    autoencoder = Autoencoder(AutoencoderConfig(image_size=16, latent_dim=DIM, channels=(4,)))
    return MVLDModel(
        preprocess=PreprocessConfig(height=16, width=16),
        autoencoder=autoencoder,
        score_net=score_net,
        sde=SDE,
        latent_stats=random_stats(VIEWS, DIM),
        fingerprint="test",
    )


def frame_sets(batch: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw latents and a mask covering none, one, two and all views missing."""
    latents = torch.randn(batch, VIEWS, DIM, generator=torch.Generator().manual_seed(seed)) * 4
    present = torch.tensor(
        [
            [True, True, True],
            [True, False, True],
            [False, True, False],
            [False, False, False],
            [True, True, False],
            [False, True, True],
        ]
    )
    return latents, present[:batch]


def test_imputer_reproduces_the_exact_conditional_in_raw_latent_units():
    stats = random_stats(VIEWS, 2, seed=5)
    exact = GaussianEps(*gaussian_problem(), SDE)
    imputer = Imputer(exact, stats, SDE)  # default sampler: dpmpp_2m_sde, 20 steps
    raw_clean = stats.destandardise(CLEAN.float())
    present = torch.tensor([[True, False, False]])
    latents = torch.where(present[..., None], raw_clean, torch.nan)  # missing: NaN
    result = imputer(latents, present, samples=4000, seed=0)
    assert result.nfe == 20 and torch.equal(result.latents[0, 0], latents[0, 0])
    z = stats.standardise(result.samples[0]).double()  # [K, V, D] back in model units
    mask = present[0]
    target = exact.conditional(mask, CLEAN.reshape(1, -1)[:, exact.dims_of(mask)])
    target = GaussianMoments(target.mean[0], target.cov)
    mean_error, cov_error = whitened_errors(z.reshape(4000, -1)[:, exact.dims_of(~mask)], target)
    assert mean_error < 0.15 and cov_error < 0.35
    true_std = target.cov.diagonal().sqrt().reshape(2, 2).mean(1).float()  # views 1, 2
    assert torch.allclose(result.uncertainty[0, 1:], true_std, rtol=0.06)
    assert result.uncertainty[0, 0] == 0


def test_posterior_mean_approaches_the_conditional_mean_and_keeps_observed_views():
    stats = random_stats(VIEWS, 2, seed=5)
    exact = GaussianEps(*gaussian_problem(), SDE)
    raw_clean = stats.destandardise(CLEAN.float())
    present = torch.tensor([[True, False, False]])
    latents = torch.where(present[..., None], raw_clean, torch.nan)
    result = Imputer(exact, stats, SDE)(latents, present, samples=2000, seed=0)
    mean = result.posterior_mean()
    assert torch.equal(mean[0, 0], latents[0, 0]), "observed views as given"
    mask = present[0]
    target = exact.conditional(mask, CLEAN.reshape(1, -1)[:, exact.dims_of(mask)])

    def error(raw: torch.Tensor) -> float:
        z = stats.standardise(raw).double().reshape(1, -1)[:, exact.dims_of(~mask)]
        return float((z[0] - target.mean[0]).norm())

    spread = float(target.cov.trace().sqrt())  # a single sample's expected distance
    assert error(mean) < 0.1 * spread < error(result.latents)


def test_observed_views_are_returned_bit_for_bit_and_provenance_is_per_view(model):
    latents, present = frame_sets()
    latents[~present] = torch.nan  # whatever the edge sent for missing views is ignored
    result = Imputer.from_model(model)(latents, present, seed=0)
    assert isinstance(result, Imputation) and result.latents.shape == latents.shape
    assert torch.equal(result.latents[present], latents[present])
    assert bool(result.latents.isfinite().all())
    assert result.provenance[0] == [Provenance.OBSERVED] * 3
    assert result.provenance[1] == [Provenance.OBSERVED, Provenance.IMPUTED, Provenance.OBSERVED]
    assert result.provenance[3] == [Provenance.UNCONDITIONED] * 3
    assert result.unconditioned.tolist() == [False, False, False, True, False, False]
    assert result.nfe == 20 and result.seconds > 0 and result.uncertainty is None


def test_complete_frame_sets_cost_nothing_and_float16_latents_stay_float16(model):
    latents, present = frame_sets()
    full = torch.ones_like(present)
    result = Imputer.from_model(model)(latents, full)
    assert result.nfe == 0 and torch.equal(result.latents, latents)
    half = Imputer.from_model(model)(latents.half(), present)
    assert half.latents.dtype == torch.float16
    assert torch.equal(half.latents[present], latents.half()[present])


def test_imputation_is_deterministic_for_a_seed(model):
    latents, present = frame_sets()
    imputer = Imputer.from_model(model, sampler="heun", steps=5)
    first, again = imputer(latents, present, seed=7), imputer(latents, present, seed=7)
    other = imputer(latents, present, seed=8)
    assert torch.equal(first.latents, again.latents) and first.nfe == 9
    assert not torch.equal(first.latents[~present], other.latents[~present])


def test_k_samples_give_a_per_view_uncertainty(model):
    latents, present = frame_sets()
    result = Imputer.from_model(model, sampler="dpmpp_2m", steps=8)(
        latents, present, samples=5, seed=0
    )
    assert result.samples.shape == (6, 5, VIEWS, DIM)
    assert torch.equal(result.samples[:, 0], result.latents)
    assert result.uncertainty.shape == (6, VIEWS)
    assert bool((result.uncertainty[present] == 0).all())
    assert bool((result.uncertainty[~present] > 0).all())
    distinct = result.samples[1, :, 1]  # the imputed view of frame set 1 differs per sample
    assert not torch.equal(distinct[0], distinct[1])
    for k in range(5):
        assert torch.equal(result.samples[:, k][present], latents[present])


def test_every_sampler_runs_through_the_imputer(model):
    latents, present = frame_sets()
    for sampler, steps in (
        ("euler_maruyama", 30),
        ("heun", 4),
        ("dpmpp_2m", 4),
        ("dpmpp_2m_sde", 4),
        ("adaptive", 200),
    ):
        result = Imputer.from_model(model, sampler=sampler, steps=steps)(latents, present)
        assert torch.equal(result.latents[present], latents[present]), sampler
        assert bool(result.latents.isfinite().all()) and result.nfe > 0, sampler


def test_bad_configuration_and_inputs_are_rejected(model):
    with pytest.raises(ConfigError, match="valid: adaptive, dpmpp_2m"):
        Imputer.from_model(model, sampler="ddpm")
    with pytest.raises(ConfigError, match="no option \\['rho'\\]; valid: spacing, t_eps"):
        Imputer.from_model(model, sampler="heun", rho=7)
    imputer = Imputer.from_model(model)
    latents, present = frame_sets()
    with pytest.raises(ValueError, match="latents must be"):
        imputer(latents[:, :2], present[:, :2])
    with pytest.raises(ValueError, match="bool"):
        imputer(latents, present.float())
    with pytest.raises(ConfigError, match="samples must be"):
        imputer(latents, present, samples=0)


@pytest.mark.gpu
def test_imputation_on_cuda_matches_the_contract(model):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    cuda_model = MVLDModel(
        model.preprocess,
        model.autoencoder,
        ScoreNet(model.score_net.config),
        model.sde,
        model.latent_stats,
        model.fingerprint,
    )
    cuda_model.score_net.load_state_dict(model.score_net.state_dict())
    cuda_model.score_net.cuda()
    latents, present = frame_sets()
    imputer = Imputer.from_model(cuda_model)
    on_gpu = imputer(latents.cuda(), present.cuda(), samples=3, seed=0)
    again = imputer(latents.cuda(), present.cuda(), samples=3, seed=0)
    assert on_gpu.latents.is_cuda and torch.equal(on_gpu.latents, again.latents)
    assert torch.equal(on_gpu.latents[present.cuda()], latents.cuda()[present.cuda()])
    on_cpu = Imputer.from_model(model)(latents, present, samples=3, seed=0)
    assert on_cpu.latents.shape == on_gpu.latents.shape and on_gpu.unconditioned[3]
