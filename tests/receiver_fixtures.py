"""A tiny random MVLD model, real encoded frame sets and a running receiver, for receiver tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.common.transport import LatentPublisher, LatentSubscriber
from mvld.common.wire import FrameSetMessage, ReasonCode, ViewRecord, ViewStatus, encode_frameset
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.checkpoint import LatentStats, MVLDModel, encoder_fingerprint, save_mvld_model
from mvld.model.score_net import ScoreNet, ScoreNetConfig
from mvld.model.sde import VPSDE

VIEWS, LATENT, SIZE = 3, 16, 32
CAMERAS = tuple(f"cam{i}" for i in range(VIEWS))


def make_tiny_model(seed: int = 0) -> MVLDModel:
    """A randomly initialised 3-view model, 32x32 images, 16-d latents."""
    torch.manual_seed(seed)
    autoencoder = Autoencoder(
        AutoencoderConfig(image_size=SIZE, latent_dim=LATENT, channels=(8, 16))
    ).eval()
    score_net = ScoreNet(
        ScoreNetConfig(num_views=VIEWS, latent_dim=LATENT, widths=(32, 16), time_dim=16)
    ).eval()
    torch.nn.init.normal_(score_net.output.weight, std=0.1)  # zero-initialised otherwise
    stats = LatentStats(torch.randn(VIEWS, LATENT) * 0.1, torch.rand(VIEWS, LATENT) + 0.5)
    return MVLDModel(
        PreprocessConfig(height=SIZE, width=SIZE),
        autoencoder,
        score_net,
        VPSDE(),
        stats,
        encoder_fingerprint(autoencoder.encoder),
    )


def save_tiny_model(root: Path, seed: int = 0) -> Path:
    """Save the tiny model with the checkpoint functions; return the checkpoint's JSON path."""
    return save_mvld_model(root / "model", make_tiny_model(seed))


def encode_views(model: MVLDModel, images: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[N, H, W, 3]`` -> float32 latents ``[N, D]`` with the model's own encoder."""
    inputs = torch.from_numpy(preprocess_images(list(images), model.preprocess, "RGB"))
    with torch.inference_mode():
        return model.autoencoder.encoder(inputs).numpy().astype(np.float32)


_POOL_SIZE = 8
_latent_pool: dict[int, tuple[MVLDModel, np.ndarray]] = {}


def _pooled_latents(model: MVLDModel, seq: int) -> np.ndarray:
    """``[V, D]`` latents of random images encoded once per model (a pool of 8, cycled by seq)."""
    if id(model) not in _latent_pool or _latent_pool[id(model)][0] is not model:
        images = np.random.default_rng(0).integers(
            0, 256, (_POOL_SIZE * VIEWS, SIZE, SIZE, 3), dtype=np.uint8
        )
        pool = encode_views(model, images).reshape(_POOL_SIZE, VIEWS, -1)
        _latent_pool[id(model)] = (model, pool)
    return _latent_pool[id(model)][1][seq % _POOL_SIZE]


def frame_set(
    model: MVLDModel,
    node: str,
    seq: int,
    *,
    failed: tuple[str, ...] = ("cam1",),
    fingerprint: str | None = None,
    capture_time: float | None = None,
) -> FrameSetMessage:
    """A real frame set: random images encoded by the model; ``failed`` cameras send nothing."""
    now = time.time() if capture_time is None else capture_time
    latents = _pooled_latents(model, seq)
    views = []
    for index, camera in enumerate(CAMERAS):
        if camera in failed:
            views.append(ViewRecord(camera, ViewStatus.FAILED, ReasonCode.TIMEOUT, None))
        else:
            views.append(ViewRecord(camera, ViewStatus.OK, ReasonCode.NONE, now, latents[index]))
    return FrameSetMessage(node, seq, time.time(), fingerprint or model.fingerprint, tuple(views))


def wire(model: MVLDModel, node: str, seq: int, **kwargs: object) -> bytes:
    """``frame_set`` encoded to wire bytes."""
    return encode_frameset(frame_set(model, node, seq, **kwargs))  # type: ignore[arg-type]


@contextmanager
def connected_publisher(
    endpoint: str, timeout_s: float = 5.0, subscriber: LatentSubscriber | None = None
) -> Iterator[LatentPublisher]:
    """A publisher to ``endpoint`` that has seen the receiver's subscription.

    A SUB socket attaches new connections only while its owner calls into it: pass the
    ``subscriber`` when no receiver thread is polling it (nothing is sent yet, so nothing is lost).
    """
    publisher = LatentPublisher(endpoint, send_hwm=1000)

    def subscribed() -> bool:
        if subscriber is not None:
            assert subscriber.recv_message(0) is None
        return publisher.has_subscriber

    try:
        wait_until(subscribed, timeout_s, "receiver subscription")
        yield publisher
    finally:
        publisher.close()


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 10 ms; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)
