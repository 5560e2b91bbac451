"""Which model serves: load it, watch for a new one, swap it in without failing a request.

The new bundle is read, verified, loaded into its own onnxruntime session and warmed up beside
the old one; only then is the reference swapped (one assignment). A request holds the scorer it
started with, so requests in flight finish on the old model. A broken or incompatible new
version is refused: the old model keeps serving and the refusal is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from service import metrics
from service.bundle import Bundle, BundleError, read_bundle, schema_changes
from service.registry import Registry, RegistryError
from service.runtime import OnnxModel
from service.scoring import Scorer
from service.settings import Settings

T = TypeVar("T")

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


@dataclass
class Loading:
    """A model load running in its own thread (a version's load, or a read of the pointer)."""

    version: str | None
    since: float = field(default_factory=time.time)
    model: OnnxModel | None = None  # once built: a timeout stops its warm-up run
    abandoned: bool = False  # given up at the timeout, still running


class ModelManager:
    def __init__(self, settings: Settings, on_swap: Callable[[Scorer], None] | None = None) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry) if settings.registry else None
        self.scorer: Scorer | None = None
        self.on_swap = on_swap
        self._refused: str | None = None  # a version already refused: not retried every poll
        self._lock = asyncio.Lock()
        self._loads: list[Loading] = []  # running now (abandoned ones included)
        self._loads_lock = threading.Lock()

    def _wanted(self) -> str | None:
        """The version that should serve now (registry pointer, or the bundle's manifest)."""
        if self.registry is not None:
            return self.registry.serving()
        assert self.settings.bundle is not None
        return read_bundle(self.settings.bundle).manifest.version

    def _load(self, loading: Loading) -> Scorer:
        bundle: Bundle
        if self.registry is not None:
            bundle = self.registry.read_serving()
        else:
            assert self.settings.bundle is not None
            bundle = read_bundle(self.settings.bundle)
        old = self.scorer
        changes = schema_changes(old.manifest, bundle.manifest) if old is not None else []
        if changes and not self.settings.allow_schema_change:
            raise BundleError(
                f"version {bundle.manifest.version} changes the features clients send "
                f"({'; '.join(changes)}); set VAE_ANOMALY_ALLOW_SCHEMA_CHANGE=true to accept it"
            )
        return self._build(bundle, loading)

    def _build(self, bundle: Bundle, loading: Loading) -> Scorer:
        scorer = Scorer(
            bundle,
            threads=self.settings.inference_threads,
            drift_features=self.settings.drift_features,
        )
        loading.model = scorer.model
        if loading.abandoned:  # given up while the session was being built
            raise BundleError(f"{bundle.path}: given up (over the reload timeout)")
        scorer.warm_up()
        return scorer

    async def _bounded(self, version: str | None, fn: Callable[[Loading], T]) -> T:
        """``fn`` in a thread of its own, for at most RELOAD_TIMEOUT seconds.

        Past the timeout the attempt is given up: an onnxruntime run in progress is stopped,
        anything else (building a session, a hung file system) is left to finish in its daemon
        thread, counted in ``vae_anomaly_model_loads_stuck`` and shown by /readyz until it
        does. The caller goes on either way: a load can never hold the reload lock for long.
        Any exception but a read error becomes a BundleError (a refusal).
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        loading = Loading(version)

        def deliver(result: T | None, error: BaseException | None) -> None:
            if not done.done():
                done.set_exception(error) if error else done.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            result, error = None, None
            try:
                result = fn(loading)
            except (BundleError, RegistryError, OSError) as e:
                error = e
            except Exception as e:  # whatever a model or a library raises is a refusal
                error = BundleError(f"{type(e).__name__}: {e}")
                error.__cause__ = e
            self._finished(loading)
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
                loop.call_soon_threadsafe(deliver, result, error)

        self._started(loading)
        threading.Thread(target=work, name=f"load-{version}", daemon=True).start()
        timeout = self.settings.reload_timeout
        try:
            return await asyncio.wait_for(done, timeout)
        except TimeoutError:
            self._abandon(loading)
            raise BundleError(
                f"loading {version or 'the pointer'} took over {timeout:g} s; given up"
            ) from None

    def _started(self, loading: Loading) -> None:
        what = loading.version or "the pointer"
        with self._loads_lock:
            # one stuck thread per thing at most, not one more at every poll of a hung mount
            if any(x.abandoned and x.version == loading.version for x in self._loads):
                raise BundleError(f"an earlier load of {what} is still stuck")
            self._loads.append(loading)

    def _finished(self, loading: Loading) -> None:
        with self._loads_lock:
            self._loads.remove(loading)
            if loading.abandoned:
                metrics.MODEL_LOADS_STUCK.dec()

    def _abandon(self, loading: Loading) -> None:
        with self._loads_lock:
            if loading not in self._loads:
                return  # it finished meanwhile
            loading.abandoned = True
            metrics.MODEL_LOADS_STUCK.inc()
        if loading.model is not None:
            loading.model.abort()

    def loading(self) -> list[dict[str, object]]:
        """Model loads running now, for /readyz: version (None: a read of the pointer),
        seconds, and whether it is stuck (given up at the timeout but still running)."""
        now = time.time()
        with self._loads_lock:
            return [
                {"version": x.version, "seconds": round(now - x.since, 1), "stuck": x.abandoned}
                for x in self._loads
                if x.version is not None or x.abandoned  # pointer reads: when stuck
            ]

    async def reload(self, *, retry_refused: bool = False) -> Reload:
        """Swap in the wanted version if it differs from the serving one."""
        async with self._lock:
            current = self.scorer.version if self.scorer else None
            try:
                wanted = await self._bounded(None, lambda _: self._wanted())
            except (BundleError, RegistryError, OSError) as e:
                return self._refuse(None, current, f"cannot read the model source: {e}")
            if wanted is None or wanted == current:
                return Reload(changed=False, version=current)
            if wanted == self._refused and not retry_refused:
                return Reload(changed=False, version=current, error="refused before")
            try:
                scorer = await self._bounded(wanted, self._load)
            except (BundleError, RegistryError, OSError) as e:
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
        scorer.drift.publish()  # its drift series exist before it counts a record
        self.scorer = scorer  # the swap: one reference assignment
        if old is not None:
            old.drift.retire()
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
            scorer = await self._earlier()
            if scorer is not None:
                self._swap(scorer)
                self._refused = refused  # still refused: not retried at every poll
                log.warning(
                    "serving an earlier version: the serving one cannot be loaded",
                    extra={"version": scorer.version, "reason": result.error},
                )
        if self.scorer is None:
            raise RuntimeError(f"no model to serve: {result.error or 'none is serving'}")

    async def _earlier(self) -> Scorer | None:
        """The newest version of the pointer's history that loads, or None."""
        registry = self.registry
        assert registry is not None
        try:
            history = registry.pointer().history
        except RegistryError:
            return None
        for version in reversed(history):

            def load(loading: Loading, v: str = version) -> Scorer:
                return self._build(registry.read(v), loading)

            try:
                return await self._bounded(version, load)
            except (BundleError, RegistryError, OSError):
                continue
        return None

    async def watch(self) -> None:
        """Poll for a new version until cancelled."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                await self.reload()
            except Exception:  # never let the watcher die
                log.exception("model watch failed")


def preflight(settings: Settings) -> tuple[str, str | None]:
    """What a worker will serve at start, loaded and warmed up as the worker will (each load
    bounded by RELOAD_TIMEOUT), without touching the metrics: ``serve`` checks this before
    starting any worker. Returns (version, why the serving version was refused, if it was and
    an earlier one serves instead); raises BundleError or RegistryError when nothing loads."""

    async def first() -> tuple[str, str | None]:
        manager = ModelManager(settings)
        try:
            return (await manager._bounded(None, manager._load)).version, None
        except (BundleError, RegistryError, OSError) as e:
            earlier = await manager._earlier() if manager.registry is not None else None
            if earlier is None:
                raise
            return earlier.version, str(e)

    return asyncio.run(first())
