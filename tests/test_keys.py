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


GOOD = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a real Z85 public key


def test_a_well_formed_key_line_loads(tmp_path: Path) -> None:
    """The control for the cases below: the same key, written as section 11 says."""
    path = tmp_path / "good.key"
    path.write_text(f'#   a comment\nmetadata\ncurve\n    public-key = "{GOOD}"\n')
    assert load_public_key(path) == GOOD.encode()


@pytest.mark.parametrize(
    "content",
    [
        "",
        "garbage\n",
        'curve\n    public-key = "short"\n',
        f"curve\n    public-key = {GOOD}\n",  # not quoted
        f'curve\n    public-key = "{GOOD}"   # a trailing note is not a comment\n',
        f'curve\n    public-key = "{GOOD[:-1]}~"\n',  # ~ is not Z85
        f'curve\n    public-key = "{GOOD}"\n    public-key = "{GOOD}"\n',
        f'#   public-key = "{GOOD}"\n',  # only a comment holds a key
    ],
)
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


def _key_with_a_hash() -> tuple[bytes, bytes]:
    while True:  # about 4 in 10 Curve keys hold a # somewhere
        public, secret = zmq.curve_keypair()
        if b"#" in public and b"#" in secret:
            return public, secret


def test_a_hash_inside_a_z85_key_is_key_text_and_whole_line_comments_are_skipped(
    tmp_path: Path,
) -> None:
    """PROTOCOL.md 11: only a line whose first non-blank is # is a comment."""
    public, secret = _key_with_a_hash()
    path = tmp_path / "node1.key_secret"
    path.write_text(
        "#   ZeroMQ CURVE Secret Certificate\n"
        '   #  public-key = "not a key: an indented comment line"\n'
        "metadata\ncurve\n"
        f'    public-key = "{public.decode()}"\n'
        f'    secret-key="{secret.decode()}"\n',
        encoding="utf-8",
    )
    path.chmod(0o600)
    assert load_secret_key(path) == (public, secret)
    assert zmq.curve_public(secret) == public


def test_keys_written_by_pyzmq_load_alike(tmp_path: Path) -> None:
    import zmq.auth

    public_file, secret_file = zmq.auth.create_certificates(tmp_path, "other")
    Path(secret_file).chmod(0o600)
    assert load_secret_key(secret_file) == zmq.auth.load_certificate(secret_file)
    assert load_public_key(public_file) == zmq.auth.load_certificate(public_file)[0]
