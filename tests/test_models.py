"""Preprocessing, autoencoder and score network: shapes, sizes and known answers."""

import numpy as np
import pytest
import torch

from mvld.common.autoencoder import Autoencoder, AutoencoderConfig, psnr
from mvld.common.errors import ConfigError
from mvld.common.preprocess import PreprocessConfig, postprocess_images, preprocess_images
from mvld.common.score_net import ScoreNet, ScoreNetConfig


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
    np.testing.assert_array_equal(preprocess_images(bgr, config, input_order="BGR"),
                                  preprocess_images(rgb, config))


def test_preprocess_resizes_to_the_model_size() -> None:
    frames = np.full((1, 120, 160, 3), 200, np.uint8)
    x = preprocess_images(frames, PreprocessConfig(height=64, width=64))
    assert x.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(x, 200 / 255 * 2 - 1, atol=1e-6)


def test_postprocess_inverts_preprocess_exactly() -> None:
    frames = _frames()
    config = PreprocessConfig()
    np.testing.assert_array_equal(postprocess_images(preprocess_images(frames, config), config),
                                  frames)


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


def test_psnr_known_answer() -> None:
    target = torch.zeros(1, 3, 4, 4)
    assert psnr(target + 0.2, target, -1.0, 1.0) == pytest.approx(10 * np.log10(4 / 0.04))
    assert psnr(target + 5.0, target, -1.0, 1.0) == pytest.approx(10 * np.log10(4 / 1.0))


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
