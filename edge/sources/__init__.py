"""Frame sources by URI: ``open_source(uri, **options) -> FrameSource``.

Schemes register a factory ``(uri, **options) -> FrameSource``; a URI without a scheme is a
file path. Registered here: ``file`` (video or image folder) and ``sim`` (the simulated rig).
Camera devices (``0``, ``v4l2://``, ``csi://``, ``rtsp://``) come from ``camera.py``.

``sim`` is loaded only when a ``sim://`` URI is used: the rig needs pybullet, which an
edge-only install (``pip install "mvld[edge]"``) lacks, and importing it costs a second.
:func:`prepare_scheme` loads it at start-up, or names the missing extra there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from mvld.common.errors import ConfigError
from mvld.common.registry import Registry
from mvld.edge.sources.base import EndOfStream, Frame, FrameSource, SourceError

SourceFactory = Callable[..., FrameSource]

_FACTORIES: Registry[SourceFactory] = Registry("source scheme")

__all__ = [
    "EndOfStream",
    "Frame",
    "FrameSource",
    "SourceError",
    "open_source",
    "prepare_scheme",
    "register_source",
    "registered_schemes",
    "scheme_of",
]


def register_source(scheme: str, factory: SourceFactory) -> None:
    """Register the factory for ``scheme://`` URIs; a second registration is an error."""
    _FACTORIES.add(scheme, factory)


def registered_schemes() -> list[str]:
    """The schemes open_source accepts, sorted."""
    return _FACTORIES.names()


def scheme_of(uri: str) -> str:
    """``sim://0`` -> ``sim``; a bare device index -> ``device``; a plain path -> ``file``."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "device" if uri.isdigit() else "file"


def open_source(uri: str, **options: object) -> FrameSource:
    """Open the source a URI names; unknown schemes and options list the valid ones."""
    scheme = scheme_of(uri)
    try:
        factory = _FACTORIES.get(scheme)
    except ConfigError as exc:
        raise ConfigError(f"{uri}: {exc}") from None
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(set(options) - set(parameters))
    if unknown and not takes_any:
        valid = sorted(name for name in parameters if name != "uri")
        raise ConfigError(f"{uri}: unknown option(s) {unknown} for {scheme}://; valid: {valid}")
    return factory(uri, **options)


SIM_EXTRA_ADVICE = 'sim:// needs pybullet, which is not installed: pip install "mvld[sim]"'


def prepare_scheme(scheme: str) -> None:
    """Load what ``scheme`` needs now, at start-up; ConfigError when the scheme is unknown or
    its extra is not installed. A camera's open runs under the capture watchdog, so a second
    spent importing the simulated rig there would count as a stuck camera."""
    _FACTORIES.get(scheme)
    if scheme == "sim":
        _sim_opener()


def _sim_opener() -> SourceFactory:
    try:
        from mvld.sim.source import open_sim
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "pybullet":
            raise
        raise ConfigError(SIM_EXTRA_ADVICE) from None
    return open_sim


def _open_sim(uri: str, **options: object) -> FrameSource:
    """``sim://N``: imports the simulated rig (and pybullet) on first use."""
    return _sim_opener()(uri, **options)


def _register_builtin() -> None:
    from mvld.edge.sources.camera import CAMERA_SCHEMES, open_camera
    from mvld.edge.sources.files import FileSource

    register_source("file", FileSource)
    register_source("sim", _open_sim)
    for scheme in CAMERA_SCHEMES:
        register_source(scheme, open_camera)


_register_builtin()
