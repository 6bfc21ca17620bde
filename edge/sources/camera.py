"""Live camera sources through OpenCV: device index, V4L2, Jetson CSI (GStreamer), RTSP.

URIs follow jetson-utils (docs/ARCHITECTURE.md section 5):

- ``0``, ``1``, ...: an OpenCV device index (any backend OpenCV picks);
- ``v4l2:///dev/video0``: a V4L2 device node (USB cameras on Linux and Jetson);
- ``csi://0``: a Jetson MIPI CSI sensor through ``nvarguscamerasrc`` (see :func:`csi_pipeline`;
  needs OpenCV built with GStreamer, as on JetPack);
- ``rtsp://[user:pass@]host[:port]/path``: a network stream through FFmpeg, with open and read
  timeouts so a dead server cannot block forever.

Options (keyword arguments, or a query string for ``0``/``v4l2``/``csi``, e.g.
``csi://0?width=1920&height=1080&fps=30&flip=2``): ``width``, ``height``, ``fps``, ``flip``
(csi only, ``nvvidconv flip-method``), ``timeout_ms`` (rtsp open/read timeout, default 5000).

``read`` blocks in the driver for as long as the driver decides: a camera that hangs is
the capture layer's job (``mvld.edge.capture`` runs every read under a watchdog and reopens
the source); a read that reports failure raises :class:`SourceError`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import cv2

from mvld.common.errors import ConfigError
from mvld.edge.sources.base import Frame, SourceError

log = logging.getLogger(__name__)

CAMERA_SCHEMES = ("device", "v4l2", "csi", "rtsp")
OPTION_NAMES = ("width", "height", "fps", "flip", "timeout_ms")
CSI_DEFAULTS = {"width": 1280, "height": 720, "fps": 30, "flip": 0}
RTSP_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class CameraSpec:
    """How to open one camera with ``cv2.VideoCapture``."""

    uri: str
    target: int | str  # device index, device path, pipeline or URL
    api: int  # cv2.CAP_* backend
    params: tuple[int, ...] = ()  # open parameters: property, value, property, value, ...
    properties: tuple[tuple[int, float], ...] = ()  # set after opening

    def describe(self) -> str:
        """The URI without credentials, for logs."""
        return redact(self.uri)


def redact(uri: str) -> str:
    """``rtsp://user:secret@host/x`` -> ``rtsp://user:***@host/x`` (logs must not leak it)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def csi_pipeline(
    sensor_id: int, width: int = 1280, height: int = 720, fps: int = 30, flip: int = 0
) -> str:
    """The GStreamer pipeline for a Jetson CSI sensor, ending in a BGR appsink for OpenCV.

    nvarguscamerasrc delivers NV12 in NVMM (GPU) memory; nvvidconv converts to BGRx in CPU
    memory (and flips); videoconvert drops the x. ``drop=true max-buffers=1`` keeps only the
    newest frame, so a slow reader gets fresh frames instead of a growing backlog.
    """
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, "
        f"framerate=(fraction){fps}/1, format=(string)NV12 ! "
        f"nvvidconv flip-method={flip} ! "
        f"video/x-raw, width=(int){width}, height=(int){height}, format=(string)BGRx ! "
        "videoconvert ! video/x-raw, format=(string)BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )


def _int_options(uri: str, options: dict[str, object]) -> dict[str, int]:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(
            f"{redact(uri)}: unknown option(s) {unknown}; valid: {list(OPTION_NAMES)}"
        )
    values: dict[str, int] = {}
    for name, value in options.items():
        try:
            if not isinstance(value, (str, int, float)):
                raise TypeError(type(value).__name__)
            values[name] = int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{redact(uri)}: option {name} must be an int, got {value!r}"
            ) from exc
        if values[name] < 0:
            raise ConfigError(f"{redact(uri)}: option {name} must be >= 0, got {value!r}")
    return values


def _size_properties(values: dict[str, int]) -> tuple[tuple[int, float], ...]:
    wanted = [
        (cv2.CAP_PROP_FRAME_WIDTH, values.get("width")),
        (cv2.CAP_PROP_FRAME_HEIGHT, values.get("height")),
        (cv2.CAP_PROP_FPS, values.get("fps")),
        (cv2.CAP_PROP_BUFFERSIZE, 1),
    ]  # newest frame, not a driver backlog
    return tuple((prop, float(value)) for prop, value in wanted if value)


def v4l2_target(path: str) -> int | str:
    """``/dev/video2`` (or a udev link to it, e.g. ``/dev/v4l/by-id/...``) -> index 2.

    OpenCV builds differ in whether V4L2 opens a device by name; by index it always does,
    and a by-id link keeps naming the same physical camera after a replug.
    """
    match = re.fullmatch(r"/dev/video(\d+)", os.path.realpath(path))
    return int(match.group(1)) if match else path


def camera_spec(uri: str, **options: object) -> CameraSpec:
    """Parse a camera URI (and options) into what OpenCV needs to open it."""
    parts = urlsplit(uri)
    scheme = "device" if uri.isdigit() else parts.scheme.lower()
    if scheme != "rtsp":  # an RTSP query string belongs to the server's URL
        options = {**dict(parse_qsl(parts.query)), **options}
    values = _int_options(uri, options)
    if scheme == "device":
        return CameraSpec(uri, int(uri), cv2.CAP_ANY, (), _size_properties(values))
    if scheme == "v4l2":
        if not parts.path.startswith("/dev/"):
            raise ConfigError(f"{uri}: expected v4l2:///dev/videoN")
        return CameraSpec(uri, v4l2_target(parts.path), cv2.CAP_V4L2, (), _size_properties(values))
    if scheme == "csi":
        if not parts.netloc.isdigit():
            raise ConfigError(f"{uri}: expected csi://N with a sensor number N")
        settings = {**CSI_DEFAULTS, **{k: v for k, v in values.items() if k in CSI_DEFAULTS}}
        return CameraSpec(uri, csi_pipeline(int(parts.netloc), **settings), cv2.CAP_GSTREAMER)
    if scheme == "rtsp":
        timeout = values.get("timeout_ms", RTSP_TIMEOUT_MS)
        params = (cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout)
        return CameraSpec(uri, uri, cv2.CAP_FFMPEG, params)
    raise ConfigError(f"{uri}: not a camera URI; camera schemes: {', '.join(CAMERA_SCHEMES)}")


class OpenCVCamera:
    """A camera (or any stream) read through ``cv2.VideoCapture``; frames as RGB."""

    def __init__(self, spec: CameraSpec) -> None:
        self.uri = spec.uri
        self.spec = spec
        self._index = 0
        capture = cv2.VideoCapture(spec.target, spec.api, list(spec.params))
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"{spec.describe()}: cannot open the camera")
        for prop, value in spec.properties:
            if not capture.set(prop, value):
                log.debug("%s: property %d=%s not accepted", spec.describe(), prop, value)
        self._capture: cv2.VideoCapture | None = capture
        log.info("opened camera %s (%s backend)", spec.describe(), capture.getBackendName())

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        """The next frame; the driver's own blocking is bounded by the capture watchdog."""
        if self._capture is None:
            raise SourceError(f"{self.spec.describe()}: source is closed")
        ok, bgr = self._capture.read()
        if not ok or bgr is None:
            raise SourceError(f"{self.spec.describe()}: read failed (disconnected?)")
        if bgr.ndim == 2:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
        else:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        frame = Frame(image=rgb, camera=self.uri, timestamp=time.time(), index=self._index)
        self._index += 1
        return frame

    def close(self) -> None:
        """Release the device."""
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def __enter__(self) -> OpenCVCamera:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_camera(uri: str, **options: object) -> OpenCVCamera:
    """The registered factory for every camera scheme."""
    return OpenCVCamera(camera_spec(uri, **options))
