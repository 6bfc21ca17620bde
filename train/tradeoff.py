"""The paper's bandwidth question: bytes per frame set against the quality of all V views.

Sending k of V latents costs the bytes of one wire message (``mvld.common.wire``: k views
``ok`` with a float16 or float32 latent, the others ``withheld``); the receiver decodes the k
views and imputes the rest. The image codecs it is compared with send all V frames as JPEG or
WebP (``cv2.imencode``) at a quality; their sweep of qualities is matched to the latent byte
budgets by the largest quality whose mean size fits the budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from mvld.common.errors import ConfigError
from mvld.common.wire import (
    FrameSetMessage,
    ReasonCode,
    ViewRecord,
    ViewStatus,
    encode_frameset,
)

log = logging.getLogger(__name__)

CODECS = {"jpeg": (".jpg", cv2.IMWRITE_JPEG_QUALITY), "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY)}
DEFAULT_QUALITIES = (1, 2, 5, 10, 20, 30, 50, 70, 90)
FINGERPRINT_LENGTH = 64  # a sha256 hex digest, as the exported encoders carry
CAMERA_ID_TEMPLATE = "cam{}"


def wire_bytes(views: int, sent: int, latent_dim: int, dtype: str) -> int:
    """Size of the wire message of one frame set with ``sent`` of ``views`` latents attached."""
    if not 0 <= sent <= views:
        raise ConfigError(f"cannot send {sent} of {views} views")
    records = []
    for v in range(views):
        camera = CAMERA_ID_TEMPLATE.format(v)
        if v < sent:
            latent = np.zeros(latent_dim, dtype=dtype)
            records.append(ViewRecord(camera, ViewStatus.OK, ReasonCode.NONE, 1.7e9, latent))
        else:
            records.append(ViewRecord(camera, ViewStatus.WITHHELD, ReasonCode.POLICY, 1.7e9))
    message = FrameSetMessage(node_id="node0", seq=123456, send_time=1.7e9,
                              encoder_fingerprint="0" * FINGERPRINT_LENGTH, views=tuple(records))
    return len(encode_frameset(message))


@dataclass
class CodecPoint:
    """All views of the frame sets coded at one quality."""

    codec: str
    quality: int
    bytes_per_frame_set: float  # mean over frame sets of the summed view sizes
    decoded: np.ndarray  # uint8 [N, V, H, W, 3] RGB


def code_frames(images: np.ndarray, codec: str, quality: int) -> CodecPoint:
    """Encode and decode every view of ``images`` (uint8 ``[N, V, H, W, 3]`` RGB)."""
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; valid: {', '.join(CODECS)}")
    suffix, flag = CODECS[codec]
    decoded = np.empty_like(images)
    total = 0
    for n in range(images.shape[0]):
        for v in range(images.shape[1]):
            bgr = cv2.cvtColor(images[n, v], cv2.COLOR_RGB2BGR)
            ok, data = cv2.imencode(suffix, bgr, [flag, int(quality)])
            if not ok:
                raise ConfigError(f"OpenCV cannot encode {codec} at quality {quality}")
            total += len(data)
            decoded[n, v] = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return CodecPoint(codec, int(quality), total / max(images.shape[0], 1), decoded)


def best_within_budget(points: list[dict], budget: float) -> dict | None:
    """The highest-quality codec point whose ``bytes_per_frame_set`` fits ``budget``, if any."""
    fitting = [p for p in points if p["bytes_per_frame_set"] <= budget]
    return max(fitting, key=lambda p: p["quality"]) if fitting else None


def latent_tradeoff(per_pattern: dict[tuple[bool, ...], tuple[np.ndarray, np.ndarray]],
                    recon_correct: np.ndarray, recon_psnr: np.ndarray, latent_dim: int
                    ) -> list[dict]:
    """Quality of all V views when k latents are sent, for k = 1..V, with wire bytes.

    ``per_pattern[mask] = (correct [N, m], psnr [N, m])`` of the imputed views of a pattern;
    ``recon_* [N, V]`` judge the sent views (decoded latents). Patterns with the same k are
    averaged; k = V is reconstruction alone.
    """
    views = recon_correct.shape[1]
    points = []
    for sent in range(1, views + 1):
        correct, quality = [], []
        masks = [m for m in per_pattern if sum(m) == sent] if sent < views else [(True,) * views]
        for mask in masks:
            c, q = recon_correct.astype(float), recon_psnr.astype(float)
            if not all(mask):
                missing = [v for v, p in enumerate(mask) if not p]
                c, q = c.copy(), q.copy()
                c[:, missing], q[:, missing] = per_pattern[mask]
            correct.append(c.mean())
            quality.append(q.mean())
        if not masks:
            continue
        points.append({"views_sent": sent, "patterns": len(masks),
                       "payload_bytes_float16": sent * latent_dim * 2,
                       "payload_bytes_float32": sent * latent_dim * 4,
                       "bytes_float16": wire_bytes(views, sent, latent_dim, "float16"),
                       "bytes_float32": wire_bytes(views, sent, latent_dim, "float32"),
                       "coherence": float(np.mean(correct)), "psnr": float(np.mean(quality))})
    return points


def codec_sweep(images: np.ndarray, judge_views, qualities: tuple[int, ...] = DEFAULT_QUALITIES
                ) -> dict[str, list[dict]]:
    """Every codec at every quality: bytes per frame set, PSNR and coherence of all views.

    ``judge_views(decoded uint8 [N * V, H, W, 3]) -> (correct [N * V], psnr [N * V])``.
    """
    out: dict[str, list[dict]] = {}
    for codec in CODECS:
        out[codec] = []
        for quality in qualities:
            point = code_frames(images, codec, quality)
            correct, quality_db = judge_views(point.decoded.reshape(-1, *images.shape[2:]))
            out[codec].append({"quality": int(quality),
                               "bytes_per_frame_set": point.bytes_per_frame_set,
                               "coherence": float(np.mean(correct)),
                               "psnr": float(np.mean(quality_db))})
        log.info("%s: %d qualities coded", codec, len(qualities))
    return out


def matched_budgets(latent_points: list[dict], codecs: dict[str, list[dict]]) -> list[dict]:
    """For every latent budget (k views, float16 and float32), the best codec point that fits."""
    rows = []
    for point in latent_points:
        for dtype in ("float16", "float32"):
            budget = point[f"bytes_{dtype}"]
            row = {"views_sent": point["views_sent"], "dtype": dtype, "bytes": budget,
                   "latent_coherence": point["coherence"], "latent_psnr": point["psnr"]}
            for codec, points in codecs.items():
                best = best_within_budget(points, budget)
                row[codec] = None if best is None else {k: best[k] for k in (
                    "quality", "bytes_per_frame_set", "coherence", "psnr")}
            rows.append(row)
    return rows
