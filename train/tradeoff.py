"""The paper's bandwidth question: bytes per frame set against the quality of all V views.

MVLD sends k of V latents in a latent precision (``int8``, ``float16``, ``float32``): the cost
is the size of the real wire message the edge would send (``mvld.common.wire``: k views ``ok``,
the others ``withheld``), and the receiver's view of it is what that message decodes to
(int8 dequantized). The receiver decodes the k views and imputes the rest, so quality is
measured on all V views against the true views: PSNR, SSIM, coherence (with labels) and FID.

The image codecs it is compared with send all V frames as JPEG or WebP (``cv2.imencode``),
either one image per view or one image of the V views tiled side by side; ``webp_tiled_half``
codes the tiled image at half the resolution and scales it back up, which is how a codec user
reaches budgets below WebP's smallest full-size file. Each sweep of qualities is matched to the
MVLD budgets by the best quality whose mean size per frame set fits the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from mvld.common.errors import ConfigError
from mvld.common.wire import (
    FrameSetMessage,
    ReasonCode,
    ViewRecord,
    ViewStatus,
    decode_frameset,
    encode_frameset,
    quantize_latent,
)

log = logging.getLogger(__name__)

LATENT_PRECISIONS = ("int8", "float16", "float32")
DEFAULT_QUALITIES = (1, 2, 5, 10, 20, 30, 50, 70, 90)
CAMERA_ID_TEMPLATE = "cam{}"


@dataclass(frozen=True)
class CodecSweep:
    """One way of sending all views with an image codec."""

    codec: str  # "jpeg" or "webp"
    tiled: bool  # one image of the views side by side, else one image per view
    downscale: int = 1  # code at 1/downscale of the resolution, scale back up on decoding


CODEC_SWEEPS = {
    "webp": CodecSweep("webp", tiled=False),
    "webp_tiled": CodecSweep("webp", tiled=True),
    "webp_tiled_half": CodecSweep("webp", tiled=True, downscale=2),
    "jpeg": CodecSweep("jpeg", tiled=False),
    "jpeg_tiled": CodecSweep("jpeg", tiled=True),
}
_CODEC_FLAGS = {
    "jpeg": (".jpg", cv2.IMWRITE_JPEG_QUALITY),
    "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY),
}


# ---------------------------------------------------------------- MVLD on the wire


def frameset_message(
    latents: np.ndarray,
    sent: np.ndarray,
    latent_shape: tuple[int, ...],
    dtype: str,
    fingerprint: str,
    seq: int = 0,
) -> FrameSetMessage:
    """The message an edge sends for one frame set: latents ``[V, D]``, ``sent [V]`` bool."""
    records = []
    for v, is_sent in enumerate(sent):
        camera = CAMERA_ID_TEMPLATE.format(v)
        if is_sent:
            latent = quantize_latent(latents[v].reshape(latent_shape), dtype)
            records.append(ViewRecord(camera, ViewStatus.OK, ReasonCode.NONE, 1.7e9, latent))
        else:
            records.append(ViewRecord(camera, ViewStatus.WITHHELD, ReasonCode.POLICY, 1.7e9))
    return FrameSetMessage(
        node_id="node0",
        seq=seq,
        send_time=1.7e9,
        encoder_fingerprint=fingerprint,
        views=tuple(records),
    )


def over_the_wire(
    latents: np.ndarray,
    sent: np.ndarray,
    latent_shape: tuple[int, ...],
    dtype: str,
    fingerprint: str,
) -> tuple[np.ndarray, np.ndarray]:
    """What the receiver gets: ``(latents [N, V, D] float32, zeros where not sent; bytes [N])``.

    Every frame set is encoded into a real message and decoded again, so the bytes are the
    message's and the values are what the receiver's decoder hands on (int8 dequantized).
    """
    received = np.zeros(latents.shape, np.float32)
    sizes = np.empty(len(latents), np.int64)
    for n, frame_latents in enumerate(latents):
        data = encode_frameset(
            frameset_message(frame_latents, sent, latent_shape, dtype, fingerprint, seq=n)
        )
        sizes[n] = len(data)
        for v, view in enumerate(decode_frameset(data).views):
            if view.latent is not None:
                received[n, v] = np.asarray(view.latent, np.float32).reshape(-1)
    return received, sizes


def sent_patterns(views: int, sent: int) -> list[tuple[bool, ...]]:
    """Every choice of ``sent`` views out of ``views``, as presence masks."""
    if not 1 <= sent <= views:
        raise ConfigError(f"cannot send {sent} of {views} views")
    masks = [tuple(bool(b >> v & 1) for v in range(views)) for b in range(2**views)]
    return [m for m in masks if sum(m) == sent]


# ---------------------------------------------------------------- image codecs


def _tile(views: np.ndarray) -> np.ndarray:
    """``[V, H, W, 3]`` -> ``[H, V * W, 3]``."""
    return np.concatenate(list(views), axis=1)


def _untile(image: np.ndarray, views: int) -> np.ndarray:
    return np.stack(np.split(image, views, axis=1))


def _code_image(rgb: np.ndarray, sweep: CodecSweep, quality: int) -> tuple[np.ndarray, int]:
    """Encode and decode one RGB image; ``(decoded RGB at the input size, bytes)``."""
    suffix, flag = _CODEC_FLAGS[sweep.codec]
    height, width = rgb.shape[:2]
    small = (
        rgb
        if sweep.downscale == 1
        else cv2.resize(
            rgb, (width // sweep.downscale, height // sweep.downscale), interpolation=cv2.INTER_AREA
        )
    )
    ok, data = cv2.imencode(suffix, cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [flag, int(quality)])
    if not ok:
        raise ConfigError(f"OpenCV cannot encode {sweep.codec} at quality {quality}")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ConfigError(f"OpenCV cannot decode its own {sweep.codec} output at quality {quality}")
    decoded = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if sweep.downscale != 1:
        decoded = cv2.resize(decoded, (width, height), interpolation=cv2.INTER_LINEAR)
    return decoded, len(data)


def code_frames(images: np.ndarray, sweep: CodecSweep, quality: int) -> tuple[np.ndarray, float]:
    """All views of ``images`` (uint8 ``[N, V, H, W, 3]`` RGB) through a codec.

    Returns the decoded views (same shape) and the mean bytes per frame set.
    """
    decoded = np.empty_like(images)
    total = 0
    views = images.shape[1]
    for n, frame_set in enumerate(images):
        if sweep.tiled:
            image, size = _code_image(_tile(frame_set), sweep, quality)
            decoded[n], total = _untile(image, views), total + size
            continue
        for v in range(views):
            decoded[n, v], size = _code_image(frame_set[v], sweep, quality)
            total += size
    return decoded, total / max(len(images), 1)


# ---------------------------------------------------------------- comparing


Quality = Callable[[np.ndarray, bool], dict]
"""``quality(decoded uint8 [N, V, H, W, 3], with_fid) -> {"psnr", "ssim", "coherence", "fid"}``."""


def codec_sweeps(
    images: np.ndarray, quality: Quality, qualities: tuple[int, ...] = DEFAULT_QUALITIES
) -> dict[str, list[dict]]:
    """Every codec sweep at every quality: bytes per frame set and quality of all views.

    FID is left out here (``None``); :func:`matched_budgets` adds it to the matched points.
    """
    out: dict[str, list[dict]] = {}
    for name, sweep in CODEC_SWEEPS.items():
        out[name] = []
        for q in qualities:
            decoded, size = code_frames(images, sweep, q)
            out[name].append(
                {"quality": int(q), "bytes_per_frame_set": size, **quality(decoded, False)}
            )
        log.info("%s: %d qualities coded", name, len(qualities))
    return out


def best_within_budget(points: list[dict], budget: float) -> dict | None:
    """The highest-quality codec point whose ``bytes_per_frame_set`` fits ``budget``, if any."""
    fitting = [p for p in points if p["bytes_per_frame_set"] <= budget]
    return max(fitting, key=lambda p: p["quality"]) if fitting else None


def matched_budgets(
    latent_points: list[dict], codecs: dict[str, list[dict]], images: np.ndarray, quality: Quality
) -> list[dict]:
    """For every MVLD point, the best point of every codec sweep that fits its bytes.

    The FID of a matched codec point is computed once per (sweep, quality) and reused.
    """
    fid_cache: dict[tuple[str, int], float | None] = {}
    rows = []
    for point in latent_points:
        row = {
            k: point[k]
            for k in ("views_sent", "dtype", "bytes", "psnr", "ssim", "coherence", "fid")
        }
        for name, points in codecs.items():
            best = best_within_budget(points, point["bytes"])
            if best is not None and (name, best["quality"]) not in fid_cache:
                decoded, _ = code_frames(images, CODEC_SWEEPS[name], best["quality"])
                fid_cache[name, best["quality"]] = quality(decoded, True)["fid"]
            row[name] = None if best is None else {**best, "fid": fid_cache[name, best["quality"]]}
        rows.append(row)
    return rows


def curve_above(rows: list[dict], metric: str, higher_is_better: bool = True) -> dict:
    """Where MVLD beats the matched codec points on ``metric``. A codec with no point that fits
    a budget is not compared there (neither a win nor a loss); the table shows it as
    "cannot fit"."""
    wins, losses = 0, []
    for row in rows:
        mine = row[metric]
        for name in CODEC_SWEEPS:
            theirs = None if row[name] is None else row[name][metric]
            if mine is None or theirs is None:
                continue
            better = mine > theirs if higher_is_better else mine < theirs
            if better:
                wins += 1
            else:
                losses.append(
                    {
                        "views_sent": row["views_sent"],
                        "dtype": row["dtype"],
                        "codec": name,
                        "mvld": mine,
                        "codec_value": theirs,
                    }
                )
    return {"metric": metric, "comparisons": wins + len(losses), "wins": wins, "losses": losses}
