"""Checkpoints rebuild exactly from their files; bad or incompatible files fail clearly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mvld.common.errors import ConfigError
from mvld.common.preprocess import PreprocessConfig
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.checkpoint import (
    LatentStats,
    MVLDModel,
    checkpoint_paths,
    encoder_fingerprint,
    load_autoencoder,
    load_mvld_model,
    save_autoencoder,
    save_mvld_model,
)
from mvld.model.score_net import ScoreNet, ScoreNetConfig
from mvld.model.sde import VPSDE
from mvld.train.state import TrainingState, load_training_state, save_training_state

PRE = PreprocessConfig(height=32, width=32)


def _model(seed: int = 0) -> MVLDModel:
    torch.manual_seed(seed)
    autoencoder = Autoencoder(AutoencoderConfig(image_size=32, latent_dim=8, channels=(8, 16)))
    score_net = ScoreNet(ScoreNetConfig(num_views=3, latent_dim=8, widths=(32, 16)))
    torch.nn.init.normal_(score_net.output.weight)
    stats = LatentStats(mean=torch.randn(3, 8), std=torch.rand(3, 8) + 0.5)
    return MVLDModel(
        preprocess=PRE,
        autoencoder=autoencoder,
        score_net=score_net,
        sde=VPSDE(beta_max=15.0),
        latent_stats=stats,
        fingerprint=encoder_fingerprint(autoencoder.encoder),
    )


def test_complete_model_round_trip_is_exact(tmp_path: Path) -> None:
    model = _model()
    save_mvld_model(tmp_path / "model", model, extra={"note": "test"})
    loaded = load_mvld_model(tmp_path / "model.json")
    for original, restored in (
        (model.autoencoder, loaded.autoencoder),
        (model.score_net, loaded.score_net),
    ):
        for (name, a), (_, b) in zip(
            original.state_dict().items(), restored.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    assert loaded.sde == model.sde and loaded.preprocess == PRE
    assert torch.equal(loaded.latent_stats.mean, model.latent_stats.mean)
    assert torch.equal(loaded.latent_stats.std, model.latent_stats.std)
    assert loaded.fingerprint == model.fingerprint
    x, tau = torch.randn(4, 3, 8), torch.rand(4, 3)
    assert torch.equal(loaded.score_net(x, tau), model.score_net.eval()(x, tau))
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.autoencoder(images), model.autoencoder.eval()(images))


def test_autoencoder_loads_from_either_kind(tmp_path: Path) -> None:
    model = _model()
    save_autoencoder(tmp_path / "ae", model.autoencoder, PRE)
    save_mvld_model(tmp_path / "full", model)
    for path in (tmp_path / "ae.safetensors", tmp_path / "full"):
        _, preprocess, fingerprint = load_autoencoder(path)
        assert fingerprint == model.fingerprint and preprocess == PRE
    with pytest.raises(ConfigError, match="expected mvld"):
        load_mvld_model(tmp_path / "ae")


def test_fingerprint_changes_with_any_encoder_weight() -> None:
    model = _model()
    before = encoder_fingerprint(model.autoencoder.encoder)
    with torch.no_grad():
        model.autoencoder.encoder.to_latent.bias[0] += 1e-6
    assert encoder_fingerprint(model.autoencoder.encoder) != before


def test_edited_encoder_weights_are_refused(tmp_path: Path) -> None:
    save_mvld_model(tmp_path / "m", _model())
    weights = load_file(str(tmp_path / "m.safetensors"))
    weights["autoencoder.encoder.to_latent.bias"] += 1.0
    save_file(weights, str(tmp_path / "m.safetensors"))
    with pytest.raises(ConfigError, match="fingerprint"):
        load_mvld_model(tmp_path / "m")


@pytest.mark.parametrize(
    "damage",
    [
        "missing_json",
        "bad_json",
        "foreign",
        "version",
        "truncated_weights",
        "wrong_shape",
        "stats_shape",
    ],
)
def test_broken_or_incompatible_checkpoints_give_a_clear_error(tmp_path: Path, damage: str) -> None:
    save_mvld_model(tmp_path / "m", _model())
    json_path, weights_path = checkpoint_paths(tmp_path / "m")
    config = json.loads(json_path.read_text())
    if damage == "missing_json":
        json_path.unlink()
    elif damage == "bad_json":
        json_path.write_text("{not json")
    elif damage == "foreign":
        json_path.write_text(json.dumps({"some": "other file"}))
    elif damage == "version":
        json_path.write_text(json.dumps(config | {"format_version": 99}))
    elif damage == "truncated_weights":
        weights_path.write_bytes(weights_path.read_bytes()[:100])
    elif damage == "wrong_shape":
        json_path.write_text(
            json.dumps(config | {"score_net": config["score_net"] | {"widths": [64, 16]}})
        )
    elif damage == "stats_shape":
        stats = config["latent_stats"]
        json_path.write_text(
            json.dumps(
                config | {"latent_stats": {"mean": stats["mean"][:2], "std": stats["std"][:2]}}
            )
        )
    with pytest.raises(ConfigError) as exc:
        load_mvld_model(tmp_path / "m")
    assert "m.json" in str(exc.value) or "m.safetensors" in str(exc.value)


def test_training_state_round_trip(tmp_path: Path) -> None:
    net = ScoreNet(ScoreNetConfig(num_views=2, latent_dim=4, widths=(16,)))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(3, 2, 4), torch.rand(3, 2)).pow(2).sum().backward()
    torch.nn.init.normal_(net.output.weight)
    net(torch.randn(3, 2, 4), torch.rand(3, 2)).pow(2).sum().backward()
    optimizer.step()
    save_training_state(
        tmp_path / "last",
        TrainingState(
            step=7,
            modules={"net": net.state_dict()},
            optimizer=optimizer.state_dict(),
            info={"best": 1.5},
        ),
    )
    state = load_training_state(tmp_path / "last")
    assert state.step == 7 and state.info == {"best": 1.5}
    fresh = torch.optim.Adam(net.parameters(), lr=1e-3)
    fresh.load_state_dict(state.optimizer)
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            assert torch.equal(fresh.state_dict()["state"][index][key], value)
    with pytest.raises(ConfigError, match="cannot resume"):
        load_training_state(tmp_path / "absent")


def test_default_model_loads_or_says_none_is_packaged() -> None:
    from mvld.common.default_model import DEFAULT_MODEL

    if checkpoint_paths(DEFAULT_MODEL)[0].is_file():
        assert load_mvld_model(None).num_views == 3
    else:
        with pytest.raises(ConfigError, match="no default model"):
            load_mvld_model(None)
