"""An example downstream task: one line per frame set naming the cameras that were imputed."""

from __future__ import annotations

from pathlib import Path


class ImputedViewLog:
    """``--task imputed-views:out=FILE``: append ``node, seq, imputed cameras`` per frame set.

    A task is any callable taking the receiver's ``FrameSetResult``; ``close()`` is optional.
    Options of ``--task`` arrive as keyword arguments with string values.
    """

    def __init__(self, out: str = "imputed-views.tsv") -> None:
        self.path = Path(out)
        self.file = self.path.open("a", encoding="utf-8")

    def __call__(self, result) -> None:
        imputed = ",".join(result.imputed_cameras) or "-"
        self.file.write(f"{result.node_id}\t{result.seq}\t{imputed}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
