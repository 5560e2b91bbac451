"""The model bundle: the contract between training (writes it) and the service (reads it).

A bundle is a directory holding exactly:

- ``model.onnx``: the whole scoring computation (preprocessing, encoder, fixed-noise sampling,
  decoder, likelihoods, scores). Inputs ``x_num`` (float32 ``[N, n_num]``, NaN = missing; numeric
  and boolean features) and ``x_cat`` (int64 ``[N, n_cat]``, category indices), each present only
  when the bundle has such features. Outputs one float32 ``[N]`` tensor per score type (``elbo``,
  ``recon``, ``iwae``; higher = more anomalous) and ``attribution`` (float32 ``[N, n_features]``,
  each feature's share of the negative log-likelihood in excess of its median on normal data;
  a row sums to 1, or less when its total excess is below that of 90% of normal records).
- ``manifest.json``: :class:`Manifest` (service/manifest.py), everything else the service needs
  (feature schema and vocabularies, thresholds, the normal score distribution, metrics, config,
  sha256 of the model).
- optionally ``posterior.onnx`` and ``decoder.onnx``, the latent space (service/latent_manifest.py).
- optionally a training report (``report.html`` and PNGs), never read by the service.

Only ONNX and JSON are ever loaded. Bundles are written to a temporary directory beside the
destination and renamed into place, so a reader never sees half a bundle.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from service.errors import DiskFull, no_room
from service.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_JSON_DEPTH,
    MISSING_INDEX,
    MISSING_TOKEN,
    MODEL_FILE,
    SCORE_TYPES,
    UNKNOWN_INDEX,
    UNKNOWN_TOKEN,
    BooleanFeature,
    BucketReference,
    BundleError,
    CategoricalFeature,
    ColumnUse,
    DataInfo,
    DateTimeColumn,
    Feature,
    Manifest,
    ModelFile,
    NumericFeature,
    Reference,
    ScoreDistribution,
    ScoreType,
    Threshold,
    TimeFeature,
    client_fields,
    input_of,
    manifest_json,
    parse_manifest,
    schema_changes,
    time_feature_name,
)

# the manifest's names too: the service, training and tests import them from here
__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "MAX_MODEL_BYTES",
    "MISSING_INDEX",
    "MISSING_TOKEN",
    "MODEL_FILE",
    "SCORE_TYPES",
    "UNKNOWN_INDEX",
    "UNKNOWN_TOKEN",
    "BooleanFeature",
    "BucketReference",
    "Bundle",
    "BundleError",
    "CategoricalFeature",
    "ColumnUse",
    "DataInfo",
    "DateTimeColumn",
    "Feature",
    "Manifest",
    "ModelFile",
    "NumericFeature",
    "Reference",
    "ScoreDistribution",
    "ScoreType",
    "Threshold",
    "TimeFeature",
    "client_fields",
    "fsync_dir",
    "input_of",
    "manifest_json",
    "open_regular",
    "parse_manifest",
    "read_bundle",
    "read_regular",
    "schema_changes",
    "sha256_file",
    "sha256_hex",
    "time_feature_name",
    "write_bundle_atomic",
]

# Bounds on what a bundle may make the service read: a model or manifest beyond them is refused
# before it is read (the demo model is ~0.2 MB, its manifest ~0.3 MB).
MAX_MODEL_BYTES = 1 << 30
MAX_MANIFEST_BYTES = 8 << 20


@contextlib.contextmanager
def open_regular(path: Path, limit: int) -> Iterator[tuple[BinaryIO, int]]:
    """``path`` opened for reading, with its size, if it is a regular file of at most ``limit``
    bytes; else BundleError.

    Nothing else in the place of a bundle file is opened or read: not a FIFO (reading one waits
    for a writer forever), a device (``/dev/zero`` never ends), a directory, nor a symbolic link
    (wherever it points: a bundle is written as regular files, and a link could lead out of it).
    The type is checked before opening (lstat) and again on what was opened (fstat), which is
    opened without following a link and without blocking. Errors opening a regular file
    (missing, permissions) are raised as OSError.
    """
    kind = _not_regular(os.lstat(path).st_mode)
    if kind:
        raise BundleError(f"{path}: {kind}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise BundleError(f"{path}: a symbolic link, not a regular file") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        kind = _not_regular(st.st_mode)
        if kind:
            raise BundleError(f"{path}: {kind}, not a regular file")
        if st.st_size > limit:
            raise BundleError(f"{path}: {st.st_size} bytes, over the limit of {limit} bytes")
        yield f, st.st_size


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISLNK: "a symbolic link", stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO"}
    return next((k for test, k in kinds.items() if test(mode)), "a device or socket")


def read_regular(path: Path, limit: int) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    with open_regular(path, limit) as (f, size):
        data = f.read(size)
        if f.read(1):
            raise BundleError(f"{path}: changed while being read")
    return data


def sha256_hex(data: bytes | BinaryIO, limit: int | None = None, name: object = "") -> str:
    """The sha256 (hex) of ``data``: bytes, or a binary file read to its end in blocks (a
    BundleError if the file ``name`` holds more than ``limit`` bytes: it grew while read)."""
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    for block in iter(lambda: data.read(1 << 20), b""):
        h.update(block)
        if limit is not None and data.tell() > limit:
            raise BundleError(f"{name}: grew over the limit of {limit} bytes while read")
    return h.hexdigest()


def sha256_file(path: Path, limit: int = MAX_MODEL_BYTES) -> str:
    """sha256 of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    with open_regular(path, limit) as (f, _):
        return sha256_hex(f, limit, path)


class Bundle:
    """A verified bundle on disk: the manifest and the path of its ONNX model."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model.file


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read and verify a bundle: manifest schema, format version, model checksum.

    Any problem is a BundleError; one caused by reading (permissions, I/O) has the OSError as
    its ``__cause__`` (it may pass: the service tries such a version again)."""
    root = Path(path)
    mpath = root / MANIFEST_FILE
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    manifest = parse_manifest(mpath, _read_manifest(root, mpath))
    if Path(manifest.model.file).name != manifest.model.file:
        raise BundleError(f"{mpath}: model file must be a plain file name")
    extra = manifest.explorer.files() if manifest.explorer else []
    for file, sha in [(manifest.model.file, manifest.model.sha256)] + [
        (f.file, f.sha256) for f in extra
    ]:
        model = root / file
        try:
            digest = sha256_file(model)
        except OSError as e:
            raise BundleError(f"{model}: unreadable model file: {e}") from e
        if digest != sha:
            raise BundleError(f"{model}: sha256 {digest} does not match the manifest ({sha})")
    return Bundle(root, manifest)


def _read_manifest(root: Path, mpath: Path) -> Any:
    try:
        return json.loads(read_regular(mpath, MAX_MANIFEST_BYTES).decode("utf-8"))
    except FileNotFoundError as e:
        raise BundleError(f"{root}: no {MANIFEST_FILE}") from e
    except OSError as e:
        raise BundleError(f"{mpath}: unreadable manifest: {e}") from e
    except RecursionError:
        raise BundleError(f"{mpath}: nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # not UTF-8, not JSON, an integer of thousands of digits
        raise BundleError(f"{mpath}: unreadable manifest: {e}") from None


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle_atomic(
    dest: str | os.PathLike[str],
    fill: Callable[[Path], None],
    *,
    overwrite: bool = False,
) -> Path:
    """Create a bundle directory at ``dest`` all at once.

    ``fill(tmp)`` writes the files into a temporary directory beside ``dest``; each is fsynced,
    then the directory is renamed into place. On any error the temporary directory is removed
    and ``dest`` is untouched; a write that failed for want of room is raised as DiskFull
    naming ``dest``.
    """
    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists (choose another path, or overwrite it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by the service
    old: Path | None = None
    placed = False
    try:
        fill(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with p.open("rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        placed = True
        fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.rename(old, dest)
        if no_room(e) and not placed:
            why = getattr(e, "strerror", e)
            raise DiskFull(f"cannot write the bundle {dest} ({why}); nothing was written") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
