"""The model registry: a directory of immutable bundle versions and a pointer to the serving one.

Layout::

    REGISTRY/
      versions/<version>/      one bundle each (see bundle.py), never changed once there
      pointer.json             {"serving": version, "history": [older serving versions, ...]}
      .lock                    taken (flock) by writers of the pointer

Versions sort in time order (UTC timestamp to the microsecond, then a random suffix, so two
trainings that finish in the same second still get distinct, ordered versions). A bundle enters
``versions/`` by one rename and the pointer is replaced by one rename (written to a temporary
file and fsynced first), so readers never take a lock and a writer killed at any moment leaves
the registry valid: at worst a ``.tmp`` leftover that readers ignore and ``prune`` removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.bundle import (
    Bundle,
    BundleError,
    fsync_dir,
    read_bundle,
    read_regular,
    schema_changes,
)
from service.errors import DiskFull, VaeAnomalyError, no_room

POINTER = "pointer.json"
GATE_FILE = "gate.json"  # a retrained version's promotion-gate decision (training/retrain.py)
VERSIONS = "versions"
HISTORY_LIMIT = 100
STALE_SECONDS = 3600
MAX_POINTER_BYTES = 1 << 20  # HISTORY_LIMIT versions take a few kB


def new_version(at: datetime | None = None) -> str:
    """Sortable and unique: UTC time (``at``, default now) to the microsecond, then a random
    suffix."""
    return (at or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


class RegistryError(VaeAnomalyError):
    """A registry operation that cannot be done, with the reason."""


@dataclass
class Pointer:
    serving: str | None = None
    history: list[str] = field(default_factory=list)  # previously serving, oldest first
    updated_at: str | None = None

    @property
    def rollback_target(self) -> str | None:
        return self.history[-1] if self.history else None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it, rename it over ``path``.

    The file is made readable by all (mkstemp makes it private), like the bundles: the service
    often runs as another user than the one who trains and promotes. A write that fails (a full
    disk) leaves ``path`` as it was and no temporary file, and raises DiskFull (for want of room)
    or RegistryError saying so.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            why = f"cannot write {path} ({e.strerror or e}); it is unchanged"
            raise (DiskFull(why) if no_room(e) else RegistryError(why)) from e
        raise
    fsync_dir(path.parent)


class Registry:
    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        if create:
            (self.root / VERSIONS).mkdir(parents=True, exist_ok=True)
        elif not (self.root / VERSIONS).is_dir():
            raise RegistryError(f"{self.root}: not a model registry (no {VERSIONS}/ directory)")

    # ------------------------------------------------------------------ reading (no lock)

    def version_path(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise RegistryError(f"invalid version name {version!r}")
        return self.root / VERSIONS / version

    def versions(self) -> list[str]:
        """Every complete version, oldest first (temporary leftovers are not versions)."""
        out = [
            p.name
            for p in (self.root / VERSIONS).iterdir()
            if not p.name.startswith(".") and p.is_dir()
        ]
        return sorted(out)

    def pointer(self) -> Pointer:
        path = self.root / POINTER
        try:
            raw = json.loads(read_regular(path, MAX_POINTER_BYTES))  # no FIFO, no endless file
        except FileNotFoundError:
            return Pointer()
        except (OSError, ValueError, BundleError, RecursionError) as e:
            raise RegistryError(f"{path}: unreadable pointer: {e}") from e
        if not isinstance(raw, dict):
            raise RegistryError(f"{path}: the pointer is not a JSON object")
        history = raw.get("history") or []
        serving = raw.get("serving")
        if not isinstance(history, list) or not (serving is None or isinstance(serving, str)):
            raise RegistryError(f"{path}: malformed pointer")
        return Pointer(
            serving=serving, history=[str(h) for h in history], updated_at=raw.get("updated_at")
        )

    def staging_path(self, version: str) -> Path:
        """Where a version is assembled before it enters ``versions/`` (hidden from readers;
        ``prune`` removes it once stale if its writer died)."""
        return self.root / VERSIONS / f".staging-{self.version_path(version).name}"

    def add(self, version: str) -> Path:
        """Move a complete staged version into ``versions/`` (one rename, made durable)."""
        dest = self.version_path(version)
        os.rename(self.staging_path(version), dest)
        fsync_dir(dest.parent)
        return dest

    def serving(self) -> str | None:
        return self.pointer().serving

    def read(self, version: str) -> Bundle:
        """Read and verify one version's bundle."""
        path = self.version_path(version)
        if not path.is_dir():
            raise RegistryError(f"no version {version!r} in {self.root}")
        return read_bundle(path)

    def gate(self, version: str) -> dict[str, Any] | None:
        """The gate's decision stored in a retrained version (None: trained, not retrained)."""
        path = self.version_path(version) / GATE_FILE
        try:
            raw = json.loads(read_regular(path, MAX_POINTER_BYTES))  # a few kB; bounded anyway
        except FileNotFoundError:
            return None
        except (OSError, ValueError, BundleError, RecursionError) as e:
            raise RegistryError(f"{path}: unreadable gate record: {e}") from e
        if not isinstance(raw, dict):
            raise RegistryError(f"{path}: the gate record is not a JSON object")
        return raw

    def read_serving(self) -> Bundle:
        version = self.serving()
        if version is None:
            raise RegistryError(f"{self.root}: no version is serving yet")
        return self.read(version)

    # ------------------------------------------------------------------ writing (locked)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write_pointer(self, p: Pointer) -> None:
        p.history = p.history[-HISTORY_LIMIT:]
        p.updated_at = datetime.now(UTC).isoformat()
        write_json_atomic(
            self.root / POINTER,
            {"serving": p.serving, "history": p.history, "updated_at": p.updated_at},
        )

    def schema_changes(self, version: str) -> list[str]:
        """How ``version`` changes the features clients send, against the serving version
        (none when nothing serves, or the serving version cannot be read)."""
        serving = self.serving()
        if serving is None or serving == version:
            return []
        try:
            old = self.read(serving).manifest
        except (BundleError, RegistryError, OSError):
            return []  # moving away from a broken version is always allowed
        return schema_changes(old, self.read(version).manifest)

    def promote(
        self, version: str, *, verify: bool = True, allow_schema_change: bool = False
    ) -> Pointer:
        """Make ``version`` the serving one, after verifying its bundle and that it keeps the
        serving version's features (the service would refuse it otherwise) unless
        ``allow_schema_change``."""
        if verify:
            try:
                self.read(version)
            except BundleError as e:
                raise RegistryError(f"version {version} is broken, not promoted: {e}") from e
            changes = [] if allow_schema_change else self.schema_changes(version)
            if changes:
                raise RegistryError(
                    f"version {version} changes the features clients send "
                    f"({'; '.join(changes)}); not promoted: a service refuses it unless it runs "
                    "with VAE_ANOMALY_ALLOW_SCHEMA_CHANGE=true. Promote it anyway with "
                    "--allow-schema-change"
                )
        elif not self.version_path(version).is_dir():
            raise RegistryError(f"no version {version!r} in {self.root}")
        with self.lock():
            p = self.pointer()
            if p.serving == version:
                return p
            if p.serving is not None:
                p.history.append(p.serving)
            p.serving = version
            self._write_pointer(p)
            return p

    def rollback(self) -> Pointer:
        """Serve the version that served before the current one."""
        with self.lock():
            p = self.pointer()
            if not p.history:
                raise RegistryError("nothing to roll back to: no earlier serving version")
            target = p.history[-1]
            try:
                self.read(target)
            except (BundleError, RegistryError) as e:
                raise RegistryError(f"cannot roll back to {target}: {e}") from e
            p.history.pop()
            p.serving = target
            self._write_pointer(p)
            return p

    def prune(self, keep: int) -> list[str]:
        """Remove all but the ``keep`` newest versions; never the serving version or the one
        rollback would return to. Returns the removed versions."""
        if keep < 1:
            raise RegistryError("keep at least 1 version")
        with self.lock():
            p = self.pointer()
            protected = {v for v in (p.serving, p.rollback_target) if v}
            versions = self.versions()
            doomed = [v for v in versions[:-keep] if v not in protected]
            for v in doomed:
                # rename first, so the version disappears at once; then delete at leisure
                trash = self.root / VERSIONS / f".trash-{v}"
                os.rename(self.version_path(v), trash)
                shutil.rmtree(trash, ignore_errors=True)
            p.history = [h for h in p.history if h not in doomed]
            if doomed:
                self._write_pointer(p)
            # leftovers of killed writers (old enough not to be a training writing right now)
            for leftover in (self.root / VERSIONS).glob(".*"):
                if leftover.is_dir() and time.time() - leftover.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
            return doomed
