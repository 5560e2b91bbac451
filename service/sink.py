"""An optional sink of scored records, as rotating JSON Lines files, for retraining.

The sink keeps a *uniform* sample (``sample``, default all) of the records the service scored,
flagged or not, each with its verdict (``_is_anomaly``), the version that scored it
(``_model_version``) and the id columns the request carried (the columns training ignored).
It must not pick records by their score: a retrain calibrates its threshold on the upper tail
of these records' scores, and a sink that kept only the low scores would cut that tail short
and put the next threshold too low (see training/retrain.py).

Scoring only puts records on a bounded queue (never waits: when the queue is full the records
are dropped and counted); one background thread per worker writes them to
``<dir>/scored-<pid>-<n>.jsonl``, starting a new file past ``max_bytes`` and keeping the newest
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

VERDICT = "_is_anomaly"  # the serving model's verdict on the record
SCORED_BY = "_model_version"
META_COLUMNS = (VERDICT, SCORED_BY)
MAX_ID_LENGTH = 256  # an id value longer than this is cut (ids are for joining, not content)


def _id_value(v: Any) -> Any:
    """An id column's value as sent, if it is a JSON scalar (else None), strings cut short."""
    if isinstance(v, str):
        return v[:MAX_ID_LENGTH]
    return v if isinstance(v, bool | int | float) or v is None else None


class RecordSink:
    def __init__(self, folder: Path, max_bytes: int, keep: int, sample: float = 1.0) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.keep = keep
        self.sample = sample
        self.rng = np.random.default_rng()
        folder.mkdir(parents=True, exist_ok=True)
        self.queue: queue.Queue[list[dict[str, Any]] | None] = queue.Queue(maxsize=1000)
        self.thread = threading.Thread(target=self._run, name="record-sink", daemon=True)
        self.thread.start()

    def offer(
        self,
        manifest: Manifest,
        columns: Mapping[str, Sequence[Any]],
        is_anomaly: np.ndarray,
        records: Sequence[Any] | None = None,
    ) -> None:
        """Queue a uniform sample of the scored records (never blocks; drops them when the
        writer is behind). ``records``: the records as sent, for their id columns."""
        n = len(is_anomaly)
        rows = (
            range(n)
            if self.sample >= 1
            else np.flatnonzero(self.rng.random(n) < self.sample).tolist()
        )
        if not len(rows):
            return
        booleans = {f.name for f in manifest.features if isinstance(f, BooleanFeature)}
        derived = timefeatures.derived_names(manifest)  # the raw date-time field is written
        ids = manifest.ignored_columns if records is not None else []
        out = []
        for i in rows:
            rec: dict[str, Any] = {
                name: (None if col[i] is None else bool(col[i]) if name in booleans else col[i])
                for name, col in columns.items()
                if name not in derived
            }
            sent = records[i] if records is not None else None
            if isinstance(sent, dict):
                rec.update({c: _id_value(sent[c]) for c in ids if c in sent})
            rec[VERDICT] = bool(is_anomaly[i])
            rec[SCORED_BY] = manifest.version
            out.append(rec)
        try:
            self.queue.put_nowait(out)
        except queue.Full:
            metrics.SINK_DROPPED.inc(len(out))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _files(self) -> list[Path]:
        return sorted(
            self.folder.glob(f"scored-{os.getpid()}-*.jsonl"),
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
                    out = (self.folder / f"scored-{os.getpid()}-{n:06d}.jsonl").open("a")
                    n += 1
                    for old in self._files()[: -self.keep]:
                        old.unlink(missing_ok=True)
                out.write("".join(json.dumps(r) + "\n" for r in batch))
                out.flush()
                metrics.SINK_WRITTEN.inc(len(batch))
        except OSError:
            log.exception("the record sink stopped writing")
        finally:
            if out is not None:
                out.close()
