"""An optional sink of records scored as normal, as rotating JSON Lines files, for retraining.

Scoring only puts records on a bounded queue (never waits: when the queue is full the records
are dropped and counted); one background thread per worker writes them to
``<dir>/normal-<pid>-<n>.jsonl``, starting a new file past ``max_bytes`` and keeping the newest
``keep`` files of its own. ``vae-anomaly retrain DIR`` reads such a folder.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service import metrics, timefeatures
from service.bundle import BooleanFeature, Manifest

log = logging.getLogger("vae_anomaly.sink")


class NormalSink:
    def __init__(self, folder: Path, max_bytes: int, keep: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.keep = keep
        folder.mkdir(parents=True, exist_ok=True)
        self.queue: queue.Queue[list[dict[str, Any]] | None] = queue.Queue(maxsize=1000)
        self.thread = threading.Thread(target=self._run, name="normal-sink", daemon=True)
        self.thread.start()

    def offer(
        self,
        manifest: Manifest,
        columns: Mapping[str, Sequence[Any]],
        is_anomaly: np.ndarray,
        percentile: np.ndarray,
        below: float,
    ) -> None:
        """Queue the records scored normal and below the ``below`` percentile (never blocks;
        drops them when the writer is behind)."""
        rows = np.flatnonzero(~is_anomaly & (percentile < below))
        if not len(rows):
            return
        booleans = {f.name for f in manifest.features if isinstance(f, BooleanFeature)}
        derived = timefeatures.derived_names(manifest)  # the raw date-time field is written
        records = [
            {
                name: (None if col[i] is None else bool(col[i]) if name in booleans else col[i])
                for name, col in columns.items()
                if name not in derived
            }
            for i in rows.tolist()
        ]
        try:
            self.queue.put_nowait(records)
        except queue.Full:
            metrics.SINK_DROPPED.inc(len(records))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _files(self) -> list[Path]:
        return sorted(
            self.folder.glob(f"normal-{os.getpid()}-*.jsonl"),
            key=lambda p: int(p.stem.rsplit("-", 1)[1]),
        )

    def _run(self) -> None:
        files = self._files()
        n = int(files[-1].stem.rsplit("-", 1)[1]) + 1 if files else 0
        out = None
        try:
            while (batch := self.queue.get()) is not None:
                if out is None or out.tell() >= self.max_bytes:
                    if out is not None:
                        out.close()
                    out = (self.folder / f"normal-{os.getpid()}-{n:06d}.jsonl").open("a")
                    n += 1
                    for old in self._files()[: -self.keep]:
                        old.unlink(missing_ok=True)
                out.write("".join(json.dumps(r) + "\n" for r in batch))
                out.flush()
                metrics.SINK_WRITTEN.inc(len(batch))
        except OSError:
            log.exception("the normal-record sink stopped writing")
        finally:
            if out is not None:
                out.close()
