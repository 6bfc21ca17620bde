"""``--task jsonl[:path=FILE]``: one JSON object per frame set (no images), ``-`` = stdout.

Each line is ``FrameSetResult.summary()``: node, seq, times, latency, per view the status,
reason, provenance and uncertainty, and the annotations of earlier tasks (e.g. classify).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from mvld.common.errors import ConfigError
from mvld.receiver.results import FrameSetResult

__all__ = ["JsonLinesLog"]


class JsonLinesLog:
    """Append one JSON line per frame set to a file (or stdout), flushed per line."""

    def __init__(self, path: str = "-") -> None:
        self.path = path
        if path == "-":
            self._stream: TextIO = sys.stdout
        else:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 closed in close()
            except OSError as exc:
                raise ConfigError(f"task jsonl: cannot open {path}: {exc}") from exc

    def __call__(self, result: FrameSetResult) -> None:
        self._stream.write(json.dumps(result.summary(), separators=(",", ":")) + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Close the file (stdout stays open)."""
        if self._stream is not sys.stdout:
            self._stream.close()
