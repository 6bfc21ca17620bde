"""The receiver's speed choices: precision by hardware, the thread default, the tuned inference
copies of the networks (same results as the stored networks, the caller's model untouched)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from receiver_fixtures import make_tiny_model

from mvld.common.errors import ConfigError
from mvld.model.score_net import ConvScoreNet, ScoreNetConfig
from mvld.receiver.decoder import LatentDecoder
from mvld.receiver.imputation import Imputer, ScoreNetEps
from mvld.receiver.precision import (
    choose_threads,
    cpu_flags,
    prepare_module,
    resolve_precision,
)

CPU = torch.device("cpu")


def test_auto_precision_is_bf16_only_on_cpus_with_bf16_arithmetic() -> None:
    assert resolve_precision("auto", CPU, flags=lambda: {"avx2", "fma"}) == torch.float32
    assert resolve_precision("auto", CPU, flags=lambda: {"avx2", "amx_bf16"}) == torch.bfloat16
    assert resolve_precision("auto", CPU, flags=lambda: {"avx512_bf16"}) == torch.bfloat16
    assert resolve_precision("bf16", CPU, flags=set) == torch.bfloat16, "asked for: given"
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("int8", CPU)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_thread_default_leaves_busy_cores_alone() -> None:
    assert choose_threads(None, cores=2, load=0.1) == 2
    assert choose_threads(None, cores=2, load=1.2) == 1
    assert choose_threads(None, cores=2, load=7.0) == 1, "at least one"
    assert choose_threads(None, cores=16, load=3.6) == 12
    assert choose_threads(3, cores=2, load=9.0) == 3, "--threads wins"
    with pytest.raises(ConfigError, match="--threads"):
        choose_threads(0)
    assert choose_threads(None) >= 1


def _conv_net() -> ConvScoreNet:
    torch.manual_seed(0)
    net = ConvScoreNet(
        ScoreNetConfig(
            num_views=3,
            latent_dim=64,
            widths=(16, 32),
            time_dim=16,
            kind="conv",
            latent_shape=(4, 4, 4),
            blocks=1,
        )
    ).eval()
    torch.nn.init.normal_(net.output.weight, std=0.1)
    return net


def test_channels_last_copy_computes_the_same_and_leaves_the_model_alone() -> None:
    net = _conv_net()
    prepared = prepare_module(net)
    conv = next(p for p in prepared.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in net.parameters()), "the caller's net is unchanged"
    x, tau = torch.randn(5, 3, 64), torch.rand(5, 3)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x, tau), net(x, tau), rtol=1e-4, atol=1e-5)


def test_tuned_imputer_and_decoder_match_the_stored_networks_in_fp32() -> None:
    model = make_tiny_model()
    latents = torch.randn(4, 3, 16)
    present = torch.tensor([[True, False, True]] * 4)
    stored = Imputer.from_model(model)(latents, present, seed=3)
    tuned = Imputer.from_model(model, precision="fp32")(latents, present, seed=3)
    torch.testing.assert_close(tuned.latents, stored.latents, rtol=1e-4, atol=1e-4)
    assert torch.equal(tuned.latents[:, [0, 2]], latents[:, [0, 2]]), "observed views exact"
    images = LatentDecoder.from_model(model)(stored.latents)
    tuned_images = LatentDecoder.from_model(model, precision="fp32")(stored.latents)
    assert images.shape == tuned_images.shape == (4, 3, 32, 32, 3)
    assert np.abs(images.astype(int) - tuned_images.astype(int)).max() <= 1


def test_bf16_autocast_runs_in_bf16_and_returns_float32_close_to_fp32() -> None:
    net = _conv_net()
    x, tau = torch.randn(2, 3, 64), torch.rand(2, 3)
    fp32 = ScoreNetEps(prepare_module(net))(x, tau)
    seen: list[torch.dtype] = []
    handle = net.input.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    bf16 = ScoreNetEps(net, compute_dtype=torch.bfloat16)(x, tau)
    handle.remove()
    assert seen == [torch.bfloat16] and bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()
