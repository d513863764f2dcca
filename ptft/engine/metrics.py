"""metrics.jsonl: one JSON object per logged training step or evaluation, flushed as written
so a crashed or running job can be read at any time."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        """enabled=False (ranks other than 0) writes nothing: one process owns the file."""
        self.path = path
        self._file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, row: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _jsonable(value):
    # JSON has no NaN/inf; write them as strings so non-finite values stay visible, not dropped.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
