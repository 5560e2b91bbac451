"""Which model serves: load it, watch for a new one, swap it in without failing a request.

The new bundle is read, verified, loaded into its own onnxruntime session and warmed up beside
the old one; only then is the reference swapped (one assignment). A request holds the scorer it
started with, so requests in flight finish on the old model. A broken or incompatible new
version is refused: the old model keeps serving and the refusal is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from service import metrics, timefeatures
from service.bundle import Bundle, BundleError, Manifest, read_bundle
from service.registry import Registry, RegistryError
from service.scoring import Scorer
from service.settings import Settings

log = logging.getLogger("vae_anomaly.lifecycle")


@dataclass
class Reload:
    changed: bool
    version: str | None  # serving after the attempt
    previous: str | None = None
    error: str | None = None


def unreadable(e: BaseException) -> bool:
    """The version could not be read (permissions, an I/O error, not there yet), rather than
    read and found bad: that may pass, so it is tried again at the next poll. A bad bundle
    (checksum, format, schema, onnxruntime) is refused once and not retried every poll."""
    return isinstance(e, OSError | RegistryError) or isinstance(e.__cause__, OSError)


def schema_of(m: Manifest) -> list[tuple[str, str, bool]]:
    """What clients depend on: feature names, kinds and whether they may be missing (a
    date-time field: its unit, in place of its time features)."""
    derived = timefeatures.derived_names(m)
    return [(f.name, f.kind, f.nullable) for f in m.features if f.name not in derived] + [
        (c.name, f"datetime {c.unit}", c.nullable) for c in m.datetime_columns
    ]


class ModelManager:
    def __init__(self, settings: Settings, on_swap: Callable[[Scorer], None] | None = None) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry) if settings.registry else None
        self.scorer: Scorer | None = None
        self.on_swap = on_swap
        self._refused: str | None = None  # a version already refused: not retried every poll
        self._lock = asyncio.Lock()

    def _wanted(self) -> str | None:
        """The version that should serve now (registry pointer, or the bundle's manifest)."""
        if self.registry is not None:
            return self.registry.serving()
        assert self.settings.bundle is not None
        return read_bundle(self.settings.bundle).manifest.version

    def _load(self) -> Scorer:
        bundle: Bundle
        if self.registry is not None:
            bundle = self.registry.read_serving()
        else:
            assert self.settings.bundle is not None
            bundle = read_bundle(self.settings.bundle)
        old = self.scorer
        if (
            old is not None
            and not self.settings.allow_schema_change
            and (schema_of(bundle.manifest) != schema_of(old.manifest))
        ):
            raise BundleError(
                f"version {bundle.manifest.version} changes the features clients send "
                f"({schema_of(bundle.manifest)} vs {schema_of(old.manifest)}); "
                "set VAE_ANOMALY_ALLOW_SCHEMA_CHANGE=true to accept it"
            )
        scorer = Scorer(bundle, threads=self.settings.inference_threads)
        scorer.warm_up()
        return scorer

    async def reload(self, *, retry_refused: bool = False) -> Reload:
        """Swap in the wanted version if it differs from the serving one."""
        async with self._lock:
            current = self.scorer.version if self.scorer else None
            try:
                wanted = await run_in_threadpool(self._wanted)
            except (BundleError, RegistryError, OSError) as e:
                return self._refuse(None, current, f"cannot read the model source: {e}")
            if wanted is None or wanted == current:
                return Reload(changed=False, version=current)
            if wanted == self._refused and not retry_refused:
                return Reload(changed=False, version=current, error="refused before")
            try:
                scorer = await run_in_threadpool(self._load)
            except (BundleError, RegistryError, OSError, RuntimeError) as e:
                return self._refuse(wanted, current, str(e), remember=not unreadable(e))
            self._swap(scorer)
            return Reload(changed=True, version=scorer.version, previous=current)

    def _refuse(
        self, wanted: str | None, current: str | None, why: str, *, remember: bool = True
    ) -> Reload:
        metrics.MODEL_RELOADS.labels("failure").inc()
        if wanted is not None and remember:
            self._refused = wanted
        log.warning(
            "model not loaded; keeping the serving one",
            extra={"wanted": wanted, "serving": current, "reason": why},
        )
        return Reload(changed=False, version=current, error=why)

    def _swap(self, scorer: Scorer) -> None:
        old = self.scorer
        self.scorer = scorer  # the swap: one reference assignment
        self._refused = None
        metrics.describe_model(scorer.manifest, old.manifest if old else None)
        metrics.MODEL_RELOADS.labels("success").inc()
        if self.on_swap is not None:
            self.on_swap(scorer)
        log.info(
            "model ready",
            extra={
                "model": scorer.manifest.name,
                "version": scorer.version,
                "previous": old.version if old else None,
                "source": str(self.settings.registry or self.settings.bundle),
            },
        )

    async def start(self) -> None:
        """Load the first model; raise if there is none to serve.

        With a registry, if the serving version cannot be loaded (it is refused, as at a poll),
        the newest earlier serving version that loads serves instead: the one the running
        workers kept when they refused it. A worker that uvicorn starts again after a crash
        then joins them, rather than failing its start-up, which makes uvicorn stop every
        worker. The refused version is handled at later polls as usual.
        """
        if self.settings.bundle is None and self.settings.registry is None:
            return
        result = await self.reload()
        if self.scorer is None and self.registry is not None:
            refused = self._refused
            scorer = await run_in_threadpool(self._earlier)
            if scorer is not None:
                self._swap(scorer)
                self._refused = refused  # still refused: not retried at every poll
                log.warning(
                    "serving an earlier version: the serving one cannot be loaded",
                    extra={"version": scorer.version, "reason": result.error},
                )
        if self.scorer is None:
            raise RuntimeError(f"no model to serve: {result.error or 'none is serving'}")

    def _earlier(self) -> Scorer | None:
        """The newest version of the pointer's history that loads, or None."""
        assert self.registry is not None
        try:
            history = self.registry.pointer().history
        except RegistryError:
            return None
        for version in reversed(history):
            try:
                scorer = Scorer(
                    self.registry.read(version), threads=self.settings.inference_threads
                )
                scorer.warm_up()
            except (BundleError, RegistryError, OSError, RuntimeError):
                continue
            return scorer
        return None

    async def watch(self) -> None:
        """Poll for a new version until cancelled."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                await self.reload()
            except Exception:  # never let the watcher die
                log.exception("model watch failed")
