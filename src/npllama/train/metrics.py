"""metrics.jsonl, a run's log: one JSON object per line (a step, an evaluation or a sample), each
with the step it belongs to; what `npllama plot` and the tests read back (``read_metrics``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointError
from ..files import atomic_write_bytes
from .run import METRICS_FILE


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with the step it belongs to."""

    def __init__(self, path: Path | None):
        self.path = path   # None: write nothing (the ranks of a data-parallel job other than 0)
        self._file = None

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (logged by a run that went on after its last checkpoint)."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line + "\n")
        atomic_write_bytes(self.path, ["".join(keep).encode("utf-8")])


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (skipping a torn last line)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no metrics file (is {run_dir} an npllama run directory?)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
