"""Stage lines on stderr with elapsed time and a rough ETA."""
from __future__ import annotations

import sys
import time


class Progress:
    """Stage lines with elapsed time and an ETA (mean time of the stages that did work so far
    × stages left)."""

    def __init__(self, name: str, total: int, stream=sys.stderr):
        self.name, self.total, self.stream = name, total, stream
        self.start = time.monotonic()
        self.done = 0
        self.worked = 0
        self.work_seconds = 0.0

    @staticmethod
    def clock(seconds: float) -> str:
        seconds = int(seconds)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def line(self, message: str) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[study {self.name} {self.clock(elapsed)}] {message}", file=self.stream,
              flush=True)

    def stage(self, message: str) -> None:
        left = self.total - self.done
        eta = ""
        if self.worked:
            eta = f", ETA ~{self.clock(self.work_seconds / self.worked * left)}"
        self.line(f"stage {self.done + 1}/{self.total}: {message}{eta}")

    def finished(self, seconds: float | None) -> None:
        """A stage ended; ``seconds`` is its work time, None when it was skipped."""
        self.done += 1
        if seconds is not None:
            self.worked += 1
            self.work_seconds += seconds
