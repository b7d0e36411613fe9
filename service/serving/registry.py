"""The models being served: loading, versions, unloading and idle eviction.

Version rule: a request that names a version gets that version; one that does not gets the
sequence's own version when it continues a live sequence, otherwise the latest ready version.
A live sequence thus stays on the version it started with until it ends.

Unload rule: an unloaded version (by RepositoryModelUnload, or by a reload that drops it)
takes no new sequences at once (new ones go to the latest remaining version); its live sequences
may go on for up to `unload_grace_s` seconds, in the background; after that the rest are ended,
and their next request fails saying the version was unloaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.errors import InvalidArgument, ModelNotFound, ModelNotReady, ServiceError
from rnnserve.repository.layout import ModelEntry, scan
from rnnserve.runtime.base import Runtime
from rnnserve.serving.model import BatchHook, Limits, ModelState, ServedModel
from rnnserve.sessions.store import Durability, MemoryStore, StateStore

logger = logging.getLogger(__name__)

RuntimeFactory = Callable[[Path], Runtime]


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


def versions_to_serve(entry: ModelEntry) -> list[int]:
    policy = entry.config.version_policy
    available = list(entry.versions)
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return available
    if which == "specific":
        return [v for v in available if v in set(policy.specific.versions)]
    keep = policy.latest.num_versions if which == "latest" else 1
    return available[-max(keep, 1) :]


class ModelRegistry:
    def __init__(
        self,
        repository: Path,
        runtime_factory: RuntimeFactory,
        limits: Limits,
        unload_grace_s: float = 30.0,
        on_batch: BatchHook | None = None,
        store: StateStore | None = None,
        durability: Durability = Durability.STEP,
    ) -> None:
        self.repository = repository
        self.store = store if store is not None else MemoryStore()
        self.durability = durability
        self._runtime_factory = runtime_factory
        self.limits = limits
        self.unload_grace_s = unload_grace_s
        self._on_batch = on_batch
        self.models: dict[str, dict[int, ServedModel]] = {}
        self._failures: dict[str, str] = {}
        self._unloaded: dict[str, str] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ lookups
    def get(self, name: str, version: str = "") -> ServedModel:
        versions = self.models.get(name)
        if not versions:
            reason = self._failures.get(name)
            if reason:
                raise ModelNotReady(f"model {name} is not ready: {reason}")
            if name in self._unloaded:
                raise ModelNotFound(
                    f"model {name} was unloaded ({self._unloaded[name]}); load it again with "
                    f"RepositoryModelLoad"
                )
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; models being served: {known}")
        if version:
            if not version.isdigit():
                raise InvalidArgument(f"model version must be a positive integer, got {version!r}")
            model = versions.get(int(version))
            if model is None:
                served = ", ".join(map(str, sorted(versions)))
                raise ModelNotFound(
                    f"model {name} has no version {version} loaded; loaded versions: {served}"
                )
            return model
        ready = [m for v, m in sorted(versions.items()) if m.state is ModelState.READY]
        if not ready:
            raise ModelNotReady(f"model {name} has no ready version")
        return ready[-1]

    def for_sequence(
        self, name: str, version: str, sequence_id: object, start: bool
    ) -> ServedModel:
        if version or start:
            return self.get(name, version)
        for _, model in sorted(self.models.get(name, {}).items(), reverse=True):
            if model.holds(sequence_id):
                return model
        return self.get(name)

    def all_models(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def index(self) -> list[IndexEntry]:
        entries: list[IndexEntry] = []
        try:
            on_disk = {e.name: e for e in scan(self.repository)}
        except ServiceError:
            on_disk = {}
        for name in sorted(set(on_disk) | set(self.models) | set(self._failures)):
            loaded = self.models.get(name, {})
            for version, model in sorted(loaded.items()):
                entries.append(IndexEntry(name, str(version), model.state.value, ""))
            if not loaded:
                reason = self._failures.get(name, "")
                state = "UNAVAILABLE" if reason else "UNLOADED"
                entries.append(IndexEntry(name, "", state, reason))
        return entries

    # ------------------------------------------------------------------ loading
    async def load_all(self) -> None:
        """Load every model; one that fails is reported and left out, the rest are served."""
        for entry in scan(self.repository):
            if entry.name in self.models or entry.name in self._unloaded:
                continue
            try:
                await self.load(entry.name)
            except ServiceError as error:
                logger.error("model %s not loaded: %s", entry.name, error)

    async def load(self, name: str) -> None:
        """Load (or reload) a model from the repository by its folder name."""
        async with self._lock:
            entries = {e.name: e for e in scan(self.repository)}
            entry = entries.get(name)
            if entry is None:
                raise ModelNotFound(
                    f"no model {name!r} in repository {self.repository} (a folder with "
                    f"config.pbtxt and a numbered version folder holding the model file)"
                )
            wanted = versions_to_serve(entry)
            if not wanted:
                raise InvalidArgument(f"model {name} has no version folder with a model file")
            current = self.models.setdefault(name, {})
            try:
                for version in wanted:
                    if version not in current:
                        current[version] = await self._load_version(entry, version)
            except ServiceError as error:
                self._failures[name] = str(error)
                if not current:
                    del self.models[name]
                raise
            self._failures.pop(name, None)
            self._unloaded.pop(name, None)
            for version in [v for v in current if v not in wanted]:
                self._drain_in_background(name, version)

    async def _load_version(self, entry: ModelEntry, version: int) -> ServedModel:
        path = entry.model_file(version)
        try:
            runtime = await asyncio.to_thread(self._runtime_factory, path)
        except ServiceError:
            raise
        except Exception as error:
            raise ModelNotReady(
                f"model {entry.name} version {version}: cannot load {path}: {error}"
            ) from error
        config = mc.ModelConfig()
        config.CopyFrom(entry.config)
        model = ServedModel(
            entry.name,
            version,
            config,
            path,
            runtime,
            self.limits,
            on_batch=self._on_batch,
            store=self.store,
            durability=self.durability,
        )
        model.start()
        logger.info(
            "loaded model %s version %d provider=%s streamable=%s",
            entry.name,
            version,
            runtime.provider,
            model.signature.streamable,
        )
        return model

    async def unload(self, name: str) -> None:
        """Stop taking new sequences on every version of `name`; drain them in the background."""
        async with self._lock:
            versions = self.models.get(name)
            if not versions:
                raise ModelNotFound(f"model {name!r} is not loaded")
            self._unloaded[name] = "unloaded by request"
            for version in list(versions):
                self._drain_in_background(name, version)

    def _drain_in_background(self, name: str, version: int) -> None:
        model = self.models[name][version]
        model.state = ModelState.UNLOADING
        task = asyncio.create_task(self._drain(model), name=f"unload-{name}-{version}")
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, model: ServedModel) -> None:
        await model.drain(self.unload_grace_s)
        versions = self.models.get(model.name, {})
        if versions.get(model.version) is model:
            del versions[model.version]
            if not versions:
                del self.models[model.name]
        logger.info("unloaded model %s version %d", model.name, model.version)

    async def quiesce(self, timeout_s: float) -> bool:
        """Wait until no step is queued or running (up to `timeout_s`); whether that happened."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(m.busy for m in self.all_models()):
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def announce(self, ttl_s: float) -> None:
        """Mark in the state store the live states a hand-over is about to write."""
        for model in self.all_models():
            try:
                await model.announce(ttl_s)
            except ServiceError as error:
                logger.error("hand-over of model %s not announced: %s", model.name, error)

    async def flush(self) -> int:
        """Write every live state to the state store where durability asks; how many were."""
        written = 0
        for model in self.all_models():
            try:
                written += await model.flush()
            except ServiceError as error:
                logger.error(
                    "states of model %s version %d not handed over: %s",
                    model.name,
                    model.version,
                    error,
                )
        return written

    async def stop(self) -> None:
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*(m.stop() for m in self.all_models()))

    def evict_idle(self) -> dict[ServedModel, int]:
        evicted: dict[ServedModel, int] = {}
        for model in self.all_models():
            if model.sequences is not None:
                gone = model.sequences.evict_idle()
                if gone:
                    evicted[model] = len(gone)
                    logger.info(
                        "evicted %d idle sequences of model %s version %d",
                        len(gone),
                        model.name,
                        model.version,
                    )
        return evicted
