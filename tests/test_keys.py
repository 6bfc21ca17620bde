"""Key files: generated owner-only, secret files readable by others are refused."""

import os
from pathlib import Path

import pytest
import zmq

from mvld.common.errors import ConfigError
from mvld.common.keys import (
    generate_keypair,
    load_allowed_keys,
    load_public_key,
    load_secret_key,
)


def test_generated_pair_loads_and_matches(tmp_path: Path) -> None:
    public_path, secret_path = generate_keypair(tmp_path, "node1")
    public, secret = load_secret_key(secret_path)
    assert load_public_key(public_path) == public
    assert zmq.curve_public(secret) == public


def test_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    _, secret_path = generate_keypair(tmp_path, "node1")
    os.chmod(secret_path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret_key(secret_path)


def test_public_file_is_not_a_secret(tmp_path: Path) -> None:
    public_path, _ = generate_keypair(tmp_path, "node1")
    os.chmod(public_path, 0o600)
    with pytest.raises(ConfigError, match="no secret key"):
        load_secret_key(public_path)


def test_allow_list_reads_every_public_key(tmp_path: Path) -> None:
    keys = {load_public_key(generate_keypair(tmp_path, f"node{i}")[0]) for i in range(3)}
    assert set(load_allowed_keys(tmp_path)) == keys


@pytest.mark.parametrize("content", ["", "garbage\n", 'curve\n    public-key = "short"\n'])
def test_corrupt_key_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(ConfigError):
        load_public_key(path)


def test_missing_files_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_secret_key(tmp_path / "nope.key_secret")
    with pytest.raises(ConfigError, match="holds no"):
        load_allowed_keys(tmp_path)
    with pytest.raises(ConfigError, match="invalid key name"):
        generate_keypair(tmp_path, "../evil")
