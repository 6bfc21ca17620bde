"""Both training stages on a tiny rig: the loss falls, resume is exact, bad input fails clearly."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from model_fixtures import tiny_ae_config, tiny_score_config, write_tiny_rig

from mvld.common.errors import ConfigError, DatasetError
from mvld.model.checkpoint import load_autoencoder, load_mvld_model
from mvld.model.score_net import ScoreNet, ScoreNetConfig
from mvld.model.sde import VPSDE
from mvld.train.autoencoder_training import train_autoencoder
from mvld.train.cli import main as train_main
from mvld.train.config import AETrainConfig, load_config
from mvld.train.distributed import DistributedContext
from mvld.train.score_training import draw_observed_masks, multi_time_loss, train_score

CPU = DistributedContext(device=torch.device("cpu"))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_rig(tmp_path_factory.mktemp("rig") / "data")


@pytest.fixture(scope="module")
def trained_ae(rig: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ae")
    return train_autoencoder(tiny_ae_config(rig, out, steps=60, val_every=20), CPU)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _trained_net() -> ScoreNet:
    torch.manual_seed(0)
    net = ScoreNet(ScoreNetConfig(num_views=3, latent_dim=4, widths=(16,)))
    torch.nn.init.normal_(net.output.weight)
    return net


# --- the masked multi-time loss


def test_masks_are_drawn_per_sample_as_proper_subsets() -> None:
    observed = draw_observed_masks(4000, 3, 0.5, torch.Generator().manual_seed(0))
    counts = observed.sum(1)
    assert set(counts.tolist()) == {0, 1, 2}  # joint, or 1..V-1 observed, never all
    assert 0.45 < (counts > 0).float().mean() < 0.55
    assert len({tuple(row) for row in observed.tolist()}) == 7  # all masks occur in one batch


def test_masked_loss_ignores_the_observed_dimensions() -> None:
    net, sde = _trained_net(), VPSDE()
    generator = torch.Generator().manual_seed(1)
    z0 = torch.randn(8, 3, 4, generator=generator)
    noise = torch.randn(8, 3, 4, generator=generator)
    t = torch.full((8,), 0.5)
    observed = torch.tensor([[True, False, False], [False, True, True]] * 4)
    base = multi_time_loss(net, sde, z0, observed, t, noise)
    # Change everything about the observed views' noise: the loss must not move.
    other_noise = torch.where(observed[..., None], 100 * torch.randn_like(noise), noise)
    torch.testing.assert_close(
        multi_time_loss(net, sde, z0, observed, t, other_noise), base, rtol=0, atol=0
    )
    # Change a missing view's noise: the loss must move.
    moved = noise.clone()
    moved[:, :, 0] += torch.where(observed, 0.0, 3.0)
    assert not torch.allclose(multi_time_loss(net, sde, z0, observed, t, moved), base)


def test_masked_loss_is_the_mean_over_missing_dimensions() -> None:
    net = ScoreNet(ScoreNetConfig(num_views=3, latent_dim=4, widths=(16,)))  # outputs zero
    noise = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    observed = torch.tensor([[True, False, True], [False, False, False]])
    loss = multi_time_loss(
        net, VPSDE(), torch.zeros(2, 3, 4), observed, torch.full((2,), 0.3), noise
    )
    torch.testing.assert_close(
        loss, torch.stack([noise[0, 1].pow(2).mean(), noise[1].pow(2).mean()])
    )


def test_observed_views_enter_the_network_clean_with_time_zero() -> None:
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            seen["x"], seen["tau"] = x, tau
            return torch.zeros_like(x)

    z0, noise = torch.ones(1, 3, 2), torch.full((1, 3, 2), 5.0)
    observed = torch.tensor([[True, False, False]])
    multi_time_loss(Recorder(), VPSDE(), z0, observed, torch.tensor([0.7]), noise)
    assert torch.equal(seen["tau"], torch.tensor([[0.0, 0.7, 0.7]]))
    assert torch.equal(seen["x"][0, 0], z0[0, 0]) and not torch.equal(seen["x"][0, 1], z0[0, 1])


# --- the stages end to end


def test_autoencoder_training_improves_reconstruction(trained_ae: Path) -> None:
    psnrs = [record["val_psnr"] for record in _metrics(trained_ae.parent)]
    assert len(psnrs) == 3 and psnrs[-1] > psnrs[0] + 2.0, psnrs
    autoencoder, preprocess, _ = load_autoencoder(trained_ae)
    assert preprocess.height == 32 and autoencoder.config.latent_dim == 16


def test_best_checkpoint_is_the_best_validation(trained_ae: Path) -> None:
    """``best`` holds the step with the highest validation PSNR, not merely the last one."""
    out = trained_ae.parent
    records = _metrics(out)
    best_record = max(records, key=lambda record: record["val_psnr"])
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == best_record["step"]
    assert (out / "best.safetensors").stat().st_size > 0


def test_score_training_lowers_the_conditional_loss(
    rig: Path, trained_ae: Path, tmp_path: Path
) -> None:
    path = train_score(tiny_score_config(rig, trained_ae, tmp_path, steps=120, val_every=40), CPU)
    losses = [record["val_cond"] for record in _metrics(tmp_path)]
    assert losses[-1] < losses[0] - 0.05, losses
    model = load_mvld_model(path)
    assert model.num_views == 3 and model.latent_stats.mean.shape == (3, 16)
    assert (tmp_path / "latents.safetensors").is_file()


def test_latent_statistics_standardise_the_training_latents(
    rig: Path, trained_ae: Path, tmp_path: Path
) -> None:
    from mvld.train.score_training import _prepare_latents

    config = tiny_score_config(rig, trained_ae, tmp_path)
    z_train = _prepare_latents(config, CPU).z_train
    # Statistics come from all present training views; the complete ones are close to N(0, 1).
    assert z_train.mean((0,)).abs().max() < 0.3
    assert (z_train.std((0,)) - 1).abs().max() < 0.3


@pytest.mark.parametrize("stage", ["ae", "score"])
def test_resume_continues_the_same_run(
    stage: str, rig: Path, trained_ae: Path, tmp_path: Path
) -> None:
    def config(out: Path, **kw):
        if stage == "ae":
            return tiny_ae_config(rig, out, checkpoint_every=10, **kw)
        return tiny_score_config(rig, trained_ae, out, checkpoint_every=10, **kw)

    train = train_autoencoder if stage == "ae" else train_score
    straight = train(config(tmp_path / "straight", steps=20), CPU)
    train(config(tmp_path / "split", steps=10), CPU)
    resumed = train(config(tmp_path / "split", steps=20, resume=True), CPU)
    a = json.loads(straight.read_text())
    b = json.loads(resumed.read_text())
    assert a["step"] == b["step"] == 20
    assert (
        straight.with_suffix(".safetensors").read_bytes()
        == resumed.with_suffix(".safetensors").read_bytes()
    )


def test_cli_trains_both_stages_from_a_toml_file(
    rig: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "train.toml"
    config.write_text(
        f'data = "{rig}"\nprogress = false\n'
        f'[ae]\nout = "{tmp_path / "ae"}"\nimage_size = 32\nlatent_channels = 0\nlatent_dim = 8\n'
        "channels = [8, 16]\n"
        "batch_size = 16\nsteps = 4\n"
        f'[score]\nout = "{tmp_path / "score"}"\nwidths = [16]\ntime_dim = 8\n'
        "batch_size = 8\nsteps = 4\n"
    )
    assert train_main(["ae", "--config", str(config), "--seed", "3"]) == 0
    assert train_main(["score", "--config", str(config), "--ae", str(tmp_path / "ae")]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    model = load_mvld_model(tmp_path / "score")
    assert model.autoencoder.config.latent_dim == 8
    saved = json.loads((tmp_path / "ae" / "last.json").read_text())["training"]
    assert saved["seed"] == 3 and saved["steps"] == 4


def test_cli_reports_bad_input_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert train_main(["ae", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "mvld-train ae:" in capsys.readouterr().err
    assert (
        train_main(
            [
                "score",
                "--data",
                str(tmp_path / "empty"),
                "--ae",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("lerning_rate = 1\n")
    assert train_main(["ae", "--config", str(bad_toml), "--data", "x"]) == 2
    assert "lerning_rate" in capsys.readouterr().err
    assert train_main(["ae", "--data", "x", "--device", "tpu"]) == 2


def test_too_large_a_batch_and_resuming_nothing_are_errors(rig: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="batch"):
        train_autoencoder(tiny_ae_config(rig, tmp_path / "a", batch_size=100_000), CPU)
    with pytest.raises(ConfigError, match="does not exist"):
        train_autoencoder(tiny_ae_config(rig, tmp_path / "b", resume=True), CPU)


def test_corrupt_images_are_reported_by_name(tmp_path: Path) -> None:
    data = write_tiny_rig(tmp_path / "data", count=8)
    (data / "cam1" / "000002.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="000002"):
        train_autoencoder(tiny_ae_config(data, tmp_path / "o", batch_size=4), CPU)


def test_classifier_learns_the_labels_and_reloads(rig: Path, tmp_path: Path) -> None:
    from mvld.model.classifier import accuracy, load_classifier
    from mvld.train.classifier_training import train_classifier
    from mvld.train.config import ClassifierTrainConfig

    config = ClassifierTrainConfig(
        data=str(rig),
        out=str(tmp_path),
        image_size=32,
        channels=(8, 16),
        batch_size=16,
        steps=80,
        val_every=40,
        lr=1e-2,
        progress=False,
    )
    path = train_classifier(config, CPU)
    assert _metrics(tmp_path)[-1]["val_accuracy"] >= 0.5  # 4 balanced classes: chance 0.25
    classifier, preprocess = load_classifier(path)
    assert preprocess.height == 32 and classifier.config.num_classes == 4
    images = torch.zeros(2, 3, 32, 32)
    assert 0.0 <= accuracy(classifier, images, torch.tensor([0, 1])) <= 1.0


def test_bf16_mixed_precision_trains_and_saves_float32_weights(rig: Path, tmp_path: Path) -> None:
    """``--precision bf16`` autocasts the forward pass; the model file stays float32."""
    path = train_autoencoder(
        tiny_ae_config(rig, tmp_path, steps=60, val_every=20, precision="bf16"), CPU
    )
    psnrs = [record["val_psnr"] for record in _metrics(tmp_path)]
    assert psnrs[-1] > psnrs[0] + 2.0, psnrs
    autoencoder, _, _ = load_autoencoder(path)
    assert {p.dtype for p in autoencoder.parameters()} == {torch.float32}
    # The forward pass really ran in bf16: the same seeded steps in fp32 end elsewhere.
    runs = {
        precision: train_autoencoder(
            tiny_ae_config(rig, tmp_path / precision, steps=5, precision=precision), CPU
        )
        for precision in ("fp32", "bf16")
    }
    assert (
        runs["fp32"].with_suffix(".safetensors").read_bytes()
        != runs["bf16"].with_suffix(".safetensors").read_bytes()
    )
    with pytest.raises(ConfigError, match="precision"):
        load_config(AETrainConfig, "ae", None, {"data": str(rig), "precision": "fp8"})


def test_ssim_term_weighs_lost_structure_above_a_level_shift_of_the_same_l1() -> None:
    from mvld.common.preprocess import PreprocessConfig
    from mvld.train.augment import gaussian_blur
    from mvld.train.autoencoder_training import reconstruction_loss

    preprocess = PreprocessConfig(height=32, width=32)
    target = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    blurred = gaussian_blur(target, torch.full((4,), 1.5))
    shifted = target + (blurred - target).abs().mean()  # the same L1 error, structure intact
    l1_only = [reconstruction_loss(x, target, preprocess, 0.0) for x in (blurred, shifted)]
    assert l1_only[0].item() == pytest.approx(l1_only[1].item(), rel=1e-4)
    with_ssim = [reconstruction_loss(x, target, preprocess, 1.0) for x in (blurred, shifted)]
    assert with_ssim[0] > with_ssim[1] + 0.1
    assert reconstruction_loss(target, target, preprocess, 1.0).item() == pytest.approx(0, abs=1e-5)


def test_cosine_schedule_runs_from_lr_to_a_tenth() -> None:
    from mvld.train.loop import set_learning_rate

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    rates = []
    for step in range(1, 11):
        set_learning_rate(optimizer, 1e-3, "cosine", step, 10)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in itertools.pairwise(rates))
    set_learning_rate(optimizer, 1e-3, "constant", 7, 10)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_unknown_schedule_is_a_config_error(rig: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["ae", "--data", str(rig), "--lr-schedule", "warp"]) == 2
    assert "lr_schedule" in capsys.readouterr().err


def test_spatial_latent_trains_a_conv_score_network_end_to_end(rig: Path, tmp_path: Path) -> None:
    """The default family: a grid latent per view and, by default, a convolutional score net."""
    from mvld.model.score_net import ConvScoreNet
    from mvld.receiver.imputation import Imputer

    ae = train_autoencoder(
        tiny_ae_config(
            rig, tmp_path / "ae", latent_channels=2, res_blocks=1, encoder_res_blocks=0, steps=20
        ),
        CPU,
    )
    autoencoder, _, _ = load_autoencoder(ae)
    assert autoencoder.config.latent_shape == (2, 8, 8) and autoencoder.config.latent_dim == 128
    last = train_score(
        tiny_score_config(rig, ae, tmp_path / "score", widths=(8, 16), blocks=1, steps=20), CPU
    )
    model = load_mvld_model(last)
    assert isinstance(model.score_net, ConvScoreNet) and model.score_net.config.kind == "conv"
    latents = torch.randn(2, 3, 128)
    present = torch.tensor([[True, False, True], [False, True, True]])
    imputed = Imputer.from_model(model, steps=8)(latents, present)
    assert torch.equal(imputed.latents[present], latents[present])
    assert torch.isfinite(imputed.latents).all()


def test_prior_training_stores_the_ridge_fit_of_its_training_latents(
    rig: Path, tmp_path: Path
) -> None:
    """``--prior``: the checkpoint carries the ridge fit of the standardised latents of its
    complete training frame sets (not of the validation tail), and the receiver samples it."""
    from safetensors.torch import load_file

    from mvld.receiver.imputation import Imputer
    from mvld.train.baselines import RidgeRegressor
    from mvld.train.frames import split_train_val

    ae = train_autoencoder(tiny_ae_config(rig, tmp_path / "ae", latent_channels=2, steps=10), CPU)
    config = tiny_score_config(
        rig, ae, tmp_path / "prior", widths=(8, 16), blocks=1, attention_heads=0, prior=True
    )
    model = load_mvld_model(train_score(config, CPU))
    assert model.score_net.prior is not None and model.score_net.config.prior_sde == (0.1, 20.0)
    cache = load_file(str(tmp_path / "prior" / "latents.safetensors"))
    latents, present = cache["latents"], cache["present"].bool()
    train_rows, _ = split_train_val(len(latents), config.val_fraction)
    rows = [i for i in train_rows if present[i].all()]
    z = model.latent_stats.standardise(latents[rows])
    _, _, expected = RidgeRegressor(z, config.prior_alpha).fit((True, False, True))
    assert torch.allclose(model.score_net.prior.weights_101, expected.float(), atol=1e-4)
    observed = torch.tensor([[True, False, True]] * 2)
    imputed = Imputer.from_model(model, steps=8)(torch.randn(2, 3, 128), observed)
    assert torch.isfinite(imputed.latents).all()


def test_a_warm_start_keeps_its_prior_fit_unless_asked_to_refit(rig: Path, tmp_path: Path) -> None:
    """``--init`` from a prior network keeps the regression fit its residuals were learned
    around, even on other data; ``--refit-prior`` fits it again on the new data."""
    ae = train_autoencoder(tiny_ae_config(rig, tmp_path / "ae", latent_channels=2, steps=10), CPU)
    shape = dict(widths=(8, 16), blocks=1, attention_heads=0, prior=True, steps=4)
    first = train_score(tiny_score_config(rig, ae, tmp_path / "first", **shape), CPU)
    other = write_tiny_rig(tmp_path / "other", count=48, seed=5)
    kept = train_score(
        tiny_score_config(other, ae, tmp_path / "kept", init=str(first), **shape), CPU
    )
    refit = train_score(
        tiny_score_config(
            other, ae, tmp_path / "refit", init=str(first), refit_prior=True, **shape
        ),
        CPU,
    )
    weights = {
        name: load_mvld_model(path).score_net.prior.weights_101
        for name, path in (("first", first), ("kept", kept), ("refit", refit))
    }
    assert torch.equal(weights["kept"], weights["first"])
    assert not torch.allclose(weights["refit"], weights["first"], atol=1e-3)


def test_warm_start_adds_attention_to_a_trained_conv_net_without_changing_it(
    rig: Path, tmp_path: Path
) -> None:
    """``init``: the new net (with attention) starts as the old one, latent statistics too."""
    ae = train_autoencoder(tiny_ae_config(rig, tmp_path / "ae", latent_channels=2, steps=10), CPU)
    old = load_mvld_model(
        train_score(
            tiny_score_config(
                rig, ae, tmp_path / "old", widths=(8, 16), blocks=1, attention_heads=0, steps=20
            ),
            CPU,
        )
    )
    tiny = dict(widths=(8, 16), blocks=1, attention_heads=4, steps=1, lr=1e-12, seed=5)
    warm = load_mvld_model(
        train_score(
            tiny_score_config(
                rig, ae, tmp_path / "warm", init=str(tmp_path / "old" / "last"), **tiny
            ),
            CPU,
        )
    )
    cold = load_mvld_model(train_score(tiny_score_config(rig, ae, tmp_path / "cold", **tiny), CPU))
    assert warm.score_net.attention is not None
    x, tau = torch.randn(4, 3, 128), torch.rand(4, 3)
    with torch.no_grad():
        assert torch.allclose(warm.score_net(x, tau), old.score_net(x, tau), atol=1e-5)
        assert not torch.allclose(cold.score_net(x, tau), old.score_net(x, tau), atol=1e-3)
    assert torch.equal(warm.latent_stats.mean, old.latent_stats.mean)
    with pytest.raises(ConfigError, match="another score network"):
        train_score(
            tiny_score_config(
                rig,
                ae,
                tmp_path / "bad",
                widths=(16, 32),
                blocks=1,
                init=str(tmp_path / "old" / "last"),
                steps=1,
            ),
            CPU,
        )
