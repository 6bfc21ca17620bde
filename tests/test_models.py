"""Preprocessing, autoencoder and score network: shapes, sizes and known answers."""

import numpy as np
import pytest
import torch

from mvld.common.errors import ConfigError
from mvld.common.preprocess import PreprocessConfig, postprocess_images, preprocess_images
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.score_net import ScoreNet, ScoreNetConfig


def _frames(count: int = 2, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_preprocess_scales_to_the_configured_range_in_channel_first_order() -> None:
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    frames[0, :, :, 0] = 255  # red
    x = preprocess_images(frames, PreprocessConfig())
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    assert np.all(x[0, 0] == 1.0) and np.all(x[0, 1:] == -1.0)


def test_preprocess_turns_bgr_capture_into_rgb_input() -> None:
    rgb = _frames()
    bgr = rgb[..., ::-1].copy()
    config = PreprocessConfig()
    np.testing.assert_array_equal(
        preprocess_images(bgr, config, input_order="BGR"), preprocess_images(rgb, config)
    )


def test_preprocess_resizes_to_the_model_size() -> None:
    frames = np.full((1, 120, 160, 3), 200, np.uint8)
    x = preprocess_images(frames, PreprocessConfig(height=64, width=64))
    assert x.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(x, 200 / 255 * 2 - 1, atol=1e-6)


def test_postprocess_inverts_preprocess_exactly() -> None:
    frames = _frames()
    config = PreprocessConfig()
    np.testing.assert_array_equal(
        postprocess_images(preprocess_images(frames, config), config), frames
    )


def test_preprocess_rejects_non_uint8_frames() -> None:
    with pytest.raises(ConfigError, match="uint8"):
        preprocess_images(np.zeros((1, 64, 64, 3), np.float32), PreprocessConfig())


@pytest.mark.parametrize(("size", "channels"), [(64, (32, 64, 64)), (128, (32, 64, 64, 64))])
def test_autoencoder_shapes_and_cpu_sized_parameter_count(size: int, channels: tuple) -> None:
    model = Autoencoder(AutoencoderConfig(image_size=size, latent_dim=64, channels=channels))
    images = torch.zeros(2, 3, size, size)
    assert model.encoder(images).shape == (2, 64)
    assert model(images).shape == images.shape
    count = sum(p.numel() for p in model.parameters())
    assert 500_000 <= count <= 1_000_000, count


def test_residual_blocks_keep_shapes_and_old_configs_load_without_them() -> None:
    config = AutoencoderConfig(image_size=32, latent_dim=16, channels=(8, 16), res_blocks=2)
    model = Autoencoder(config)
    images = torch.randn(2, 3, 32, 32)
    assert model.encoder(images).shape == (2, 16) and model(images).shape == images.shape
    plain = Autoencoder(AutoencoderConfig(image_size=32, latent_dim=16, channels=(8, 16)))
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in plain.parameters())
    assert AutoencoderConfig.from_dict(config.to_dict()) == config
    saved_before = {k: v for k, v in plain.config.to_dict().items() if k != "res_blocks"}
    assert AutoencoderConfig.from_dict(saved_before).res_blocks == 0
    with pytest.raises(ConfigError, match="res_blocks"):
        AutoencoderConfig(res_blocks=-1)


def test_autoencoder_rejects_an_indivisible_image_size() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        AutoencoderConfig(image_size=60, channels=(8, 16, 32))


def test_score_net_output_shape_and_zero_initial_output() -> None:
    net = ScoreNet(ScoreNetConfig(num_views=3, latent_dim=16, widths=(64, 32)))
    x, tau = torch.randn(5, 3, 16), torch.rand(5, 3)
    eps = net(x, tau)
    assert eps.shape == x.shape
    assert torch.count_nonzero(eps) == 0


def test_score_net_depends_on_the_per_view_times() -> None:
    torch.manual_seed(0)
    net = ScoreNet(ScoreNetConfig(num_views=3, latent_dim=8, widths=(32, 16)))
    torch.nn.init.normal_(net.output.weight)  # leave the zero start so the output can differ
    x = torch.randn(4, 3, 8)
    same = net(x, torch.zeros(4, 3))
    other = net(x, torch.tensor([[0.0, 0.5, 0.5]]).expand(4, 3))
    assert not torch.allclose(same, other)


def test_spatial_latent_is_a_grid_that_keeps_where_things_are() -> None:
    """A spatial latent is C x h x w, flattened on the wire; a local change moves it most there."""
    config = AutoencoderConfig(
        image_size=64,
        latent_dim=4 * 8 * 8,
        channels=(16, 16, 16),
        latent_channels=4,
        res_blocks=1,
        encoder_res_blocks=0,
    )
    assert config.latent_shape == (4, 8, 8)
    model = Autoencoder(config).eval()
    images = torch.zeros(2, 3, 64, 64)
    with torch.no_grad():
        latents = model.encoder(images)
        assert latents.shape == (2, 256)
        assert model.decoder(latents).shape == images.shape
        changed = images.clone()
        changed[1, :, :8, :8] = 1.0  # top-left corner only
        delta = (model.encoder(changed)[1] - latents[1]).view(4, 8, 8).abs().sum(0)
    # GroupNorm spreads a little of any change over the grid; the corner cells move the most
    assert delta[:2, :2].mean() > 2 * delta[4:, 4:].mean()


def test_spatial_latent_size_must_match_its_grid() -> None:
    with pytest.raises(ConfigError, match="latent_dim 256"):
        AutoencoderConfig(image_size=64, latent_dim=128, channels=(16, 16, 16), latent_channels=4)


def test_conv_score_net_keeps_the_contract_and_starts_at_zero() -> None:
    from mvld.model.score_net import ConvScoreNet, make_score_net

    config = ScoreNetConfig(
        num_views=3,
        latent_dim=4 * 8 * 8,
        widths=(16, 32),
        time_dim=16,
        kind="conv",
        latent_shape=(4, 8, 8),
        blocks=1,
    )
    net = make_score_net(config)
    assert isinstance(net, ConvScoreNet)
    x, tau = torch.randn(5, 3, 256), torch.rand(5, 3)
    out = net(x, tau)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised output
    assert ScoreNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="latent_shape"):
        ScoreNetConfig(num_views=3, latent_dim=100, kind="conv", latent_shape=(4, 8, 8))


def test_conv_score_net_sees_every_view_and_its_time() -> None:
    """Changing one view's latent or time changes the output for the other views."""
    from mvld.model.score_net import make_score_net

    torch.manual_seed(0)
    config = ScoreNetConfig(
        num_views=3,
        latent_dim=64,
        widths=(16, 32),
        time_dim=16,
        kind="conv",
        latent_shape=(1, 8, 8),
        blocks=1,
    )
    net = make_score_net(config)
    torch.nn.init.normal_(net.output.weight, std=0.1)  # leave the zero start
    x, tau = torch.randn(1, 3, 64), torch.tensor([[0.0, 0.5, 0.5]])
    base = net(x, tau)
    other = x.clone()
    other[0, 0] += 1.0
    assert not torch.allclose(net(other, tau)[0, 1], base[0, 1])
    assert not torch.allclose(net(x, torch.tensor([[0.0, 0.9, 0.5]]))[0, 2], base[0, 2])


def test_grid_attention_starts_as_identity_so_a_trained_net_can_be_warm_started() -> None:
    """A conv net with attention added loads the weights of one without it and computes the
    same output until the attention's zero-initialised projection is trained."""
    from mvld.model.score_net import make_score_net

    torch.manual_seed(0)
    base = ScoreNetConfig(
        num_views=3,
        latent_dim=64,
        widths=(16, 32),
        time_dim=16,
        kind="conv",
        latent_shape=(1, 8, 8),
        blocks=1,
    )
    plain = make_score_net(base)
    torch.nn.init.normal_(plain.output.weight, std=0.1)
    with_attention = make_score_net(ScoreNetConfig(**{**base.__dict__, "attention_heads": 4}))
    missing, unexpected = with_attention.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("attention.") for name in missing)
    x, tau = torch.randn(2, 3, 64), torch.rand(2, 3)
    assert torch.allclose(with_attention(x, tau), plain(x, tau), atol=1e-6)
    torch.nn.init.normal_(with_attention.attention.proj.weight, std=0.1)
    assert not torch.allclose(with_attention(x, tau), plain(x, tau), atol=1e-4)
    with pytest.raises(ConfigError, match="attention_heads"):
        ScoreNetConfig(**{**base.__dict__, "attention_heads": 5})


def _prior_config(**overrides: object) -> ScoreNetConfig:
    base = dict(
        num_views=3,
        latent_dim=64,
        widths=(16, 32),
        time_dim=16,
        kind="conv",
        latent_shape=(1, 8, 8),
        blocks=1,
    )
    return ScoreNetConfig(**{**base, **overrides})  # type: ignore[arg-type]


def test_regression_prior_reproduces_the_ridge_baseline_for_every_pattern() -> None:
    """The prior inside the score network is the ridge baseline: same estimates, observed
    views untouched, the mean (0) where no view is observed."""
    from mvld.model.score_net import make_score_net
    from mvld.train.baselines import RidgeRegressor

    torch.manual_seed(0)
    train = torch.randn(500, 3, 64)
    train[:, 2] = 0.7 * train[:, 0] - 0.3 * train[:, 1] + 0.1 * train[:, 2]
    ridge = RidgeRegressor(train)
    net = make_score_net(_prior_config(prior_sde=(0.1, 20.0)))
    assert net.prior is not None and len(net.prior.patterns) == 6
    net.prior.load_fits({m: ridge.fit(m) for m in net.prior.patterns})
    x = torch.randn(8, 3, 64)
    present = torch.tensor(
        [[True, False, False], [False, True, False], [False, False, True]] * 2
        + [[True, True, False], [False, False, False]]
    )
    estimate = net.prior(x, present)
    expected = ridge(x, present).float()
    rows = present.any(1)
    assert torch.allclose(estimate[rows], expected[rows], atol=1e-4)
    assert torch.equal(estimate[present], x[present])
    assert torch.count_nonzero(estimate[~rows]) == 0
    with pytest.raises(ConfigError, match="no fit"):
        net.prior.load_fits({})


def test_the_receivers_ridge_imputer_serves_a_prior_nets_fit_without_a_ridge_file(
    tmp_path,
) -> None:
    """One fit, stored once: a checkpoint whose score network carries a regression prior needs
    no ridge file for ``--imputer ridge``, and a saved, reloaded model imputes what the ridge
    baseline computes (in raw latents: the model's statistics are undone)."""
    from mvld.model.checkpoint import (
        LatentStats,
        MVLDModel,
        encoder_fingerprint,
        load_mvld_model,
        save_mvld_model,
    )
    from mvld.model.score_net import make_score_net
    from mvld.model.sde import VPSDE
    from mvld.receiver.ridge_imputer import RidgeImputer, ridge_path
    from mvld.train.baselines import RidgeRegressor

    torch.manual_seed(0)
    autoencoder = Autoencoder(
        AutoencoderConfig(image_size=32, latent_dim=64, channels=(8, 16), latent_channels=1)
    ).eval()
    train = torch.randn(500, 3, 64)
    train[:, 1] = 0.5 * train[:, 0] + 0.2 * train[:, 1]
    net = make_score_net(_prior_config(prior_sde=(0.1, 20.0))).eval()
    ridge = RidgeRegressor(train)
    net.prior.load_fits({m: ridge.fit(m) for m in net.prior.patterns})
    stats = LatentStats(torch.full((3, 64), 0.5), torch.full((3, 64), 2.0))
    model = MVLDModel(
        PreprocessConfig(height=32, width=32),
        autoencoder,
        net,
        VPSDE(),
        stats,
        encoder_fingerprint(autoencoder.encoder),
    )
    checkpoint = save_mvld_model(tmp_path / "model", model)
    assert not ridge_path(checkpoint).exists()
    loaded = load_mvld_model(checkpoint)
    imputer = RidgeImputer.beside(checkpoint, loaded)
    z = torch.randn(4, 3, 64)
    present = torch.tensor(
        [[True, False, False], [True, True, False], [False, True, True], [False, False, False]]
    )
    raw = stats.destandardise(z)
    result = imputer(raw, present)
    expected = ridge(z, present).float()
    expected[3] = 0.0  # nothing observed: the training mean
    assert torch.allclose(result.latents, stats.destandardise(expected), atol=1e-4)
    assert torch.equal(result.latents[present], raw[present])


def test_a_prior_net_with_an_empty_prior_is_the_plain_net_and_uses_a_fitted_one() -> None:
    """Warm start: a prior net loaded with a plain net's weights computes the same eps until
    its prior is fitted; then it denoises the residual, so its output changes."""
    from mvld.model.score_net import make_score_net

    torch.manual_seed(0)
    plain = make_score_net(_prior_config())
    torch.nn.init.normal_(plain.output.weight, std=0.1)
    shifted = make_score_net(_prior_config(prior_sde=(0.1, 20.0)))
    missing, unexpected = shifted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(n.startswith("prior") for n in missing)
    x, tau = torch.randn(4, 3, 64), torch.rand(4, 3)
    tau[:, 0] = 0  # view 0 observed
    with torch.no_grad():
        assert torch.allclose(shifted(x, tau), plain(x, tau), atol=1e-6)
        eye = torch.eye(64)
        fits = {
            m: (
                torch.zeros(64 * sum(m)),
                torch.ones(64 * (3 - sum(m))),
                torch.zeros(64 * sum(m), 64 * (3 - sum(m))),
            )
            for m in shifted.prior.patterns
        }
        fits[(True, False, False)] = (torch.zeros(64), torch.zeros(128), torch.cat([eye, eye], 1))
        shifted.prior.load_fits(fits)
        assert not torch.allclose(shifted(x, tau), plain(x, tau), atol=1e-4)
    with pytest.raises(ConfigError, match="prior_sde"):
        _prior_config(prior_sde=(20.0, 0.1))
    assert ScoreNetConfig.from_dict(shifted.config.to_dict()) == shifted.config
