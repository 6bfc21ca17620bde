"""CurveZMQ key files: generate them owner-only, refuse secret files others can read.

Files use ZeroMQ's certificate format (what ``zmq_cert`` and pyzmq write):
``NAME.key`` holds the public key and may be shared; ``NAME.key_secret`` holds both
keys and is created with mode 0600. A receiver's allow-list is a folder of ``*.key``
files, one per edge node (the "Ironhouse" pattern of the ZeroMQ guide).

The reader is ours and follows docs/PROTOCOL.md section 11 to the letter: a line whose first
non-blank character is ``#`` is a comment as a whole, and a ``#`` anywhere else is text,
because the Z85 alphabet has ``#`` (and ``=``); a key line is ``public-key`` or
``secret-key``, ``=`` (the first one), and 40 Z85 characters in double quotes.
"""

import datetime
import os
import stat
from pathlib import Path

import zmq
from zmq.utils import z85

from mvld.common.errors import ConfigError

_KEY_NAMES = ("public-key", "secret-key")
_Z85_KEY_CHARS = 40
_Z85_ALPHABET = frozenset(z85.Z85CHARS.decode("ascii"))

_HEADER = "#   ****  Generated on {date} by mvld  ****\n#   ZeroMQ CURVE {kind} Certificate\n"
_SECRET_WARNING = "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"


def _certificate_text(public: bytes, secret: bytes | None) -> str:
    kind = "**Secret**" if secret is not None else "Public"
    text = _HEADER.format(date=datetime.datetime.now().isoformat(timespec="seconds"), kind=kind)
    if secret is not None:
        text += _SECRET_WARNING
    text += f'\nmetadata\ncurve\n    public-key = "{public.decode("ascii")}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode("ascii")}"\n'
    return text


def _write_new_file(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no window with wider permissions)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key file") from exc
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)
    os.chmod(path, mode)


def generate_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600); return both paths."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid key name {name!r}: use a plain file name such as 'node1'")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_path = folder / f"{name}.key"
    secret_path = folder / f"{name}.key_secret"
    _write_new_file(secret_path, _certificate_text(public, secret), 0o600)
    _write_new_file(public_path, _certificate_text(public, None), 0o644)
    return public_path, secret_path


def load_secret_key(path: str | Path) -> tuple[bytes, bytes]:
    """Return ``(public, secret)`` from a secret key file readable by its owner only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"secret key file {path} does not exist")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"secret key file {path} has mode {mode:04o}: it must be readable by its owner "
            f"only (run `chmod 600 {path}`)"
        )
    public, secret = _load_certificate(path)
    if secret is None:
        raise ConfigError(f"{path} holds no secret key (is it a public .key file?)")
    return public, secret


def load_public_key(path: str | Path) -> bytes:
    """Return the public key stored in a ``.key`` or ``.key_secret`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"public key file {path} does not exist")
    return _load_certificate(path)[0]


def load_allowed_keys(directory: str | Path) -> list[bytes]:
    """Return the public keys of every ``*.key`` file in an allow-list folder."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"allow-list folder {folder} does not exist")
    keys = [load_public_key(path) for path in sorted(folder.glob("*.key"))]
    if not keys:
        raise ConfigError(f"allow-list folder {folder} holds no *.key files")
    return keys


def _load_certificate(path: Path) -> tuple[bytes, bytes | None]:
    """``(public, secret or None)`` of a certificate file; ConfigError naming the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from exc
    keys: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):  # whole-line comments only
            continue
        name, equals, value = text.partition("=")
        name = name.strip()
        if not equals or name not in _KEY_NAMES:
            continue  # section names and other metadata
        keys[name] = _z85_key(value.strip(), f"{path}:{number}", name, keys)
    if "public-key" not in keys:
        raise ConfigError(f"{path} holds no valid Z85 public key")
    return keys["public-key"], keys.get("secret-key")


def _z85_key(value: str, where: str, name: str, seen: dict[str, bytes]) -> bytes:
    """A quoted 40-character Z85 key that decodes to 32 bytes."""
    if name in seen:
        raise ConfigError(f"{where}: a second {name} line")
    if len(value) != _Z85_KEY_CHARS + 2 or value[0] != '"' or value[-1] != '"':
        raise ConfigError(
            f"{where}: {name} must be {_Z85_KEY_CHARS} Z85 characters in double "
            f"quotes, got {value[:60]!r}"
        )
    text = value[1:-1]
    if not all(c in _Z85_ALPHABET for c in text):
        raise ConfigError(f"{where}: {name} holds characters outside the Z85 alphabet")
    key = text.encode("ascii")
    if len(z85.decode(key)) != 32:
        raise ConfigError(f"{where}: {name} does not decode to a 32-byte Curve key")
    return key
