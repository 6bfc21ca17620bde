"""Per-camera memory: the last latent each camera of each node sent, and when it was taken.

Video-aware imputation (docs/RECEIVER.md, Camera memory) conditions a failed camera's view on
its own last good latent together with the other cameras now. The memory lives with the
compute stage that owns the node (the worker thread, or the Ray worker the node is hashed
to), so per-node order holds. Ages use the edge's clock on both ends (the view's capture time
then, the frame set's send time now), so the receiver's clock never enters. A node whose
sequence number goes backwards has restarted: its memory is cleared. At most ``max_nodes``
nodes are remembered; the least recently seen is forgotten first.

A camera that fails for a picture fault (covered, dirty, black, noise, ...) was sending that
picture for a few frames before the edge confirmed the fault (docs/HEALTH.md: 10 frames for
an obstruction), so its newest latents may already show the cover. The memory keeps the last
``guard_frames + 1`` observations of each camera and recalls, for such a fault, the one
``guard_frames`` observations before the newest; a camera whose source stopped delivering
(disconnected, timeout, ...) or whose view was withheld by policy sent good frames to the
end and recalls its newest. Fewer observations than the guard: no memory.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from mvld.common.errors import ConfigError
from mvld.common.wire import ReasonCode, ViewRecord
from mvld.receiver.ingest import PendingFrameSet

__all__ = ["CameraMemory", "Recall"]


@dataclass(frozen=True)
class Recall:
    """Memories of a batch: raw ``latents [B, V, D]`` and ``age [B, V]`` seconds (inf: none)."""

    latents: np.ndarray
    age: np.ndarray

    @property
    def any(self) -> bool:
        """Whether any camera of the batch has a memory."""
        return bool(np.isfinite(self.age).any())


SOURCE_OUTAGES = frozenset(  # no frame arrived: everything sent before was judged as it was
    {
        ReasonCode.TIMEOUT,
        ReasonCode.DISCONNECTED,
        ReasonCode.READ_ERROR,
        ReasonCode.END_OF_STREAM,
        ReasonCode.STALE,
        ReasonCode.POLICY,
    }
)


class _NodeMemory:
    def __init__(self, views: int, keep: int) -> None:
        self.history: list[deque[tuple[float, np.ndarray]]] = [
            deque(maxlen=keep) for _ in range(views)
        ]  # per camera: (edge capture time, latent), oldest first
        self.seq = -1


class CameraMemory:
    """Remembers the newest observed latents of every camera of every node (bounded)."""

    def __init__(
        self, views: int, dim: int, *, max_nodes: int = 256, guard_frames: int = 10
    ) -> None:
        if max_nodes < 1 or guard_frames < 0:
            raise ConfigError(
                f"memory needs max_nodes >= 1 and guard_frames >= 0, got {max_nodes}, "
                f"{guard_frames}"
            )
        self.views, self.dim, self.max_nodes = views, dim, max_nodes
        self.guard_frames = guard_frames
        self._nodes: OrderedDict[str, _NodeMemory] = OrderedDict()
        self.restarts = 0  # nodes whose memory was cleared because their seq went back

    def __len__(self) -> int:
        return len(self._nodes)

    def recall(self, items: list[PendingFrameSet]) -> Recall:
        """Memories for a batch as it was before each frame set, then remember its views.

        Items are handled in order, so a node's earlier frame set in the same batch is the
        memory of its later one.
        """
        latents = np.zeros((len(items), self.views, self.dim), dtype=np.float32)
        age = np.full((len(items), self.views), np.inf)
        for b, item in enumerate(items):
            node = self._node(item.message.node_id, item.message.seq)
            for v, history in enumerate(node.history):
                back = 0 if item.present[v] else self._guard(item.records[v])
                if len(history) > back:
                    taken, latents[b, v] = history[-1 - back]
                    age[b, v] = max(item.message.send_time - taken, 0.0)
            self._remember(node, item)
        return Recall(latents, age)

    def _guard(self, record: ViewRecord | None) -> int:
        """Observations to pass over for a camera missing with ``record``'s reason."""
        if record is not None and ReasonCode(record.reason) in SOURCE_OUTAGES:
            return 0
        return self.guard_frames

    def _node(self, node_id: str, seq: int) -> _NodeMemory:
        node = self._nodes.get(node_id)
        if node is not None and seq < node.seq:  # the node restarted: its past is another run
            self.restarts += 1
            node = None
        if node is None:
            node = _NodeMemory(self.views, self.guard_frames + 1)
            self._nodes[node_id] = node
            while len(self._nodes) > self.max_nodes:
                self._nodes.popitem(last=False)
        self._nodes.move_to_end(node_id)
        node.seq = max(node.seq, seq)
        return node

    @staticmethod
    def _remember(node: _NodeMemory, item: PendingFrameSet) -> None:
        for v, record in enumerate(item.records):
            if item.present[v] and record is not None:
                taken = (
                    record.capture_time
                    if record.capture_time is not None
                    else item.message.send_time
                )
                history = node.history[v]
                if not history or taken >= history[-1][0]:
                    history.append((taken, item.latents[v].copy()))
