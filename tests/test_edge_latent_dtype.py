"""What the edge puts in a latent map: ``--latent-dtype`` (flag, default, validation) and the
wire shape ``sh`` it derives without torch."""

from pathlib import Path

import pytest

from mvld.common.errors import ConfigError
from mvld.common.wire import DEFAULT_LATENT_DTYPE, LATENT_DTYPES, latent_nbytes
from mvld.edge.cli import build_parser, config_from_args
from mvld.edge.node import EdgeConfig

BASE = ["--cams", "sim://0", "--connect", "tcp://127.0.0.1:5555", "--model", "model-folder"]


def test_the_default_is_int8_and_the_help_says_so() -> None:
    assert DEFAULT_LATENT_DTYPE == "int8"
    assert config_from_args(build_parser().parse_args(BASE)).latent_dtype == "int8"
    help_text = " ".join(build_parser().format_help().split())
    assert "--latent-dtype {float16,float32,int8}" in help_text
    assert "(default: int8)" in help_text


@pytest.mark.parametrize("dtype", sorted(LATENT_DTYPES))
def test_every_wire_dtype_is_selectable(dtype: str) -> None:
    config = config_from_args(build_parser().parse_args([*BASE, "--latent-dtype", dtype]))
    assert config.latent_dtype == dtype
    assert latent_nbytes(512, dtype) == 512 * {"int8": 1, "float16": 2, "float32": 4}[dtype]


def test_other_dtypes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*BASE, "--latent-dtype", "uint8"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--latent-dtype"):
        EdgeConfig(
            cameras=("sim://0",), connect=("tcp://h:1",), model=Path("m"), latent_dtype="uint8"
        )


@pytest.mark.parametrize(
    "architecture",
    [
        {"image_size": 64, "latent_dim": 128, "channels": (48, 96, 128)},
        {"image_size": 64, "latent_dim": 512, "channels": (32, 64, 128), "latent_channels": 8},
        {"image_size": 16, "latent_dim": 32, "channels": (8, 16), "latent_channels": 2},
    ],
)
def test_the_edge_derives_the_wire_shape_as_the_model_does(architecture: dict) -> None:
    """The edge has no torch, so it reads ``sh`` from the export's metadata itself."""
    from mvld.edge.encoder import latent_shape_of
    from mvld.model.autoencoder import AutoencoderConfig

    config = AutoencoderConfig(**architecture)
    assert latent_shape_of(config.to_dict()) == config.latent_shape
