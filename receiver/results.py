"""The typed result the receiver hands to downstream tasks: one complete frame set.

Every camera the model knows appears once, in the model's view order, with its decoded image,
its latent and where that latent came from (observed on the wire, imputed from the observed
views, or generated unconditioned when the edge sent no usable view). Times are POSIX seconds
of the receiver's clock, except the capture times, which are the edge's clock: the end-to-end
latency is only meaningful when the clocks are synchronised (NTP/PTP) or on one machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mvld.receiver.imputation import Provenance
from mvld.receiver.ingest import CameraLayout, PendingFrameSet

__all__ = ["FrameSetResult", "Provenance", "ViewResult"]


@dataclass(frozen=True, eq=False)
class ViewResult:
    """One camera of a completed frame set."""

    camera_id: str
    status: str  # the edge's wire status: ok, failed, obstructed, withheld, or "absent"
    reason: str  # the edge's reason code ("none" for ok views, "absent" when not reported)
    provenance: Provenance
    image: np.ndarray  # uint8 [H, W, 3], RGB
    latent: np.ndarray  # float32 [D] raw (destandardised) latent that was decoded
    uncertainty: float | None  # standardised units; 0 for observed, None without K > 1 samples
    capture_time: float | None  # edge clock; None when the camera produced no frame


@dataclass(eq=False)
class FrameSetResult:
    """A complete frame set of one node; ``annotations`` collects what earlier hooks add."""

    node_id: str
    seq: int
    send_time: float  # edge clock, when the edge encoded the message
    receive_time: float  # receiver clock, when the message was taken off the socket
    done_time: float  # receiver clock, when imputation and decoding had finished
    views: tuple[ViewResult, ...]
    client_key: str | None = None  # CurveZMQ public key (Z85) of the sender, None without Curve
    annotations: dict[str, Any] = field(default_factory=dict)
    clock_ok: bool = True  # the edge's times were within the clock window (latency is counted)

    @classmethod
    def complete(
        cls,
        item: PendingFrameSet,
        layout: CameraLayout,
        latents: np.ndarray,
        images: np.ndarray,
        provenance: Sequence[Provenance],
        uncertainty: Sequence[float] | None,
        done_time: float,
    ) -> FrameSetResult:
        """Combine a pending frame set with its ``[V, D]`` latents and ``[V, H, W, 3]`` images."""
        views = []
        for index, camera in enumerate(layout.camera_ids):
            record = item.records[index]
            views.append(
                ViewResult(
                    camera_id=camera,
                    status="absent" if record is None else record.status.value,
                    reason="absent" if record is None else record.reason.value,
                    provenance=provenance[index],
                    image=images[index],
                    latent=latents[index],
                    uncertainty=None if uncertainty is None else float(uncertainty[index]),
                    capture_time=None if record is None else record.capture_time,
                )
            )
        message = item.message
        return cls(
            message.node_id,
            message.seq,
            message.send_time,
            item.receive_time,
            done_time,
            tuple(views),
            item.client_key,
            clock_ok=item.clock_ok,
        )

    @property
    def capture_time(self) -> float:
        """Earliest capture time of the frame set (the send time if no camera had a frame)."""
        times = [v.capture_time for v in self.views if v.capture_time is not None]
        return min(times) if times else self.send_time

    @property
    def latency(self) -> float:
        """End-to-end seconds from the earliest capture to the complete, decoded frame set."""
        return self.done_time - self.capture_time

    @property
    def observed_views(self) -> int:
        """How many views came from the edge; 0: the frame set was generated from nothing."""
        return sum(v.provenance is Provenance.OBSERVED for v in self.views)

    @property
    def imputed_cameras(self) -> list[str]:
        """Camera ids whose view was not observed (imputed or unconditioned)."""
        return [v.camera_id for v in self.views if v.provenance is not Provenance.OBSERVED]

    def view(self, camera_id: str) -> ViewResult:
        """The view of ``camera_id``; KeyError if the model has no such camera."""
        for view in self.views:
            if view.camera_id == camera_id:
                return view
        raise KeyError(camera_id)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description without images or latents (for logs and publishers)."""
        return {
            "node": self.node_id,
            "seq": self.seq,
            "capture_time": self.capture_time,
            "send_time": self.send_time,
            "receive_time": self.receive_time,
            "done_time": self.done_time,
            "latency_s": self.latency,
            "views": [
                {
                    "cam": v.camera_id,
                    "status": v.status,
                    "reason": v.reason,
                    "provenance": v.provenance.value,
                    "uncertainty": v.uncertainty,
                    "capture_time": v.capture_time,
                }
                for v in self.views
            ],
            "annotations": self.annotations,
        }
