"""The models being served: loading, versions, unloading and idle eviction.

Version rule: a request that names a version gets that version; one that does not gets the
sequence's own version when it continues a live sequence, otherwise the latest ready version.
A live sequence thus stays on the version it started with until it ends.

Unload rule: an unloaded version (by RepositoryModelUnload, or by a reload that drops it)
takes no new sequences at once (new ones go to the latest remaining version); its live sequences
may go on for up to `unload_grace_s` seconds, in the background; after that the rest are ended,
and their next request fails saying the version was unloaded.

Shutdown rule (`Admission`): draining, the registry refuses new sequences and requests without
one, and lets live sequences go on; handing over (with a shared state store), it refuses every
request in a sequence too, so that clients continue on another replica.

The registry runs on the event loop; `snapshot()` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.errors import (
    InvalidArgument,
    ModelNotFound,
    ModelNotReady,
    ServiceError,
    ShuttingDown,
)
from rnnserve.repository.layout import ModelEntry, scan
from rnnserve.runtime.base import Runtime
from rnnserve.serving.model import Limits, ModelState, ServedModel
from rnnserve.serving.policy import Policy, PolicySettings
from rnnserve.serving.request import InferenceRequest
from rnnserve.serving.snapshot import ModelSnapshot
from rnnserve.sessions.store import Durability, MemoryStore, StateStore

logger = logging.getLogger(__name__)

RuntimeFactory = Callable[[Path], Runtime]


class Admission(enum.Enum):
    """Which requests the registry takes."""

    OPEN = "open"
    DRAINING = "draining"
    """Shutting down: no new sequences and no requests outside one; live sequences go on."""
    HANDING_OVER = "handing_over"
    """Shutting down with a shared store: no request in a sequence either (another replica
    continues it from the store)."""


@dataclass(frozen=True)
class IndexEntry:
    """One row of RepositoryIndex."""

    name: str
    version: str
    state: str
    reason: str


def versions_to_serve(entry: ModelEntry) -> list[int]:
    """The versions Triton's `version_policy` asks for (latest 1 by default), ascending."""
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
    """The models being served, and which requests go to which (see the module docstring)."""

    def __init__(
        self,
        repository: Path,
        runtime_factory: RuntimeFactory,
        limits: Limits,
        unload_grace_s: float = 30.0,
        store: StateStore | None = None,
        durability: Durability = Durability.STEP,
        policy: Policy | None = None,
    ) -> None:
        self.repository = repository
        self.policy = policy if policy is not None else Policy(PolicySettings())
        """Admin calls and the per-principal and whole-server limits."""
        self.store = store if store is not None else MemoryStore()
        self.durability = durability
        self._runtime_factory = runtime_factory
        self.limits = limits
        self.unload_grace_s = unload_grace_s
        self.admission = Admission.OPEN
        self.models: dict[str, dict[int, ServedModel]] = {}
        # Every loaded version, replaced whole on each change: another thread reads it as it is.
        self._published: tuple[ServedModel, ...] = ()
        self._failures: dict[str, str] = {}
        self._unloaded: dict[str, str] = {}
        self._retiring: dict[ServedModel, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ lookups
    @property
    def ready(self) -> bool:
        """Whether the server takes new work: models are loaded and it is not shutting down."""
        return self.admission is Admission.OPEN and bool(self.models)

    def resolve(self, request: InferenceRequest) -> ServedModel:
        """The model version that serves `request` (the version rule, the shutdown rule).

        Raises ShuttingDown, ModelNotFound, ModelNotReady or InvalidArgument.
        """
        control = request.sequence
        if self.admission is not Admission.OPEN:
            if control.start or not control.id:
                raise ShuttingDown("the server is shutting down and takes no new sequences")
            if self.admission is Admission.HANDING_OVER:
                raise ShuttingDown(
                    "the server is shutting down and hands its sequences over to the state "
                    "store; send this request to another replica, which continues the sequence"
                )
        if control.id and not request.version and not control.start:
            for _, model in sorted(self.models.get(request.model, {}).items(), reverse=True):
                if model.holds(control.id, request.principal):
                    return model
        return self.get(request.model, request.version)

    def get(self, name: str, version: str = "", any_state: bool = False) -> ServedModel:
        """Version `version` of model `name`, or when empty its latest ready version (with
        `any_state`, its latest loaded one, as metadata and statistics describe it).

        Raises ModelNotFound, ModelNotReady or InvalidArgument (a version that is not a number).
        """
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
            # isdigit() alone takes "²" and digits of other scripts, which int() refuses, and
            # int() refuses more than 4300 digits: both would fail as INTERNAL.
            if not (version.isascii() and version.isdigit() and len(version) <= 19):
                raise InvalidArgument(
                    f"model version must be a positive integer of at most 19 digits, got "
                    f"{version!r}"
                )
            model = versions.get(int(version))
            if model is None:
                served = ", ".join(map(str, sorted(versions)))
                raise ModelNotFound(
                    f"model {name} has no version {version} loaded; loaded versions: {served}"
                )
            return model
        loaded = [m for _, m in sorted(versions.items())]
        ready = [m for m in loaded if m.state is ModelState.READY]
        if any_state or ready:
            return (ready or loaded)[-1]
        raise ModelNotReady(
            f"model {name} is being unloaded and takes no new sequences (its live ones go on "
            f"for up to {self.unload_grace_s:g} s); load it again with RepositoryModelLoad"
        )

    def versions(self, name: str) -> list[int]:
        """The loaded versions of model `name`, ascending (none when it is not loaded)."""
        return sorted(self.models.get(name, {}))

    def all_models(self) -> tuple[ServedModel, ...]:
        """Every loaded version (safe from any thread)."""
        return self._published

    def snapshot(self) -> list[ModelSnapshot]:
        """The figures of every loaded version, as they are now (safe from any thread)."""
        return [model.snapshot() for model in self._published]

    def _publish(self) -> None:
        self._published = tuple(m for versions in self.models.values() for m in versions.values())

    def index(self) -> list[IndexEntry]:
        """RepositoryIndex: every model on disk or loaded, with its state."""
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
                    model = current.get(version)
                    if model is not None and model.state is ModelState.UNLOADING:
                        self._keep(model)  # still in its grace: it serves on, sequences too
                    elif model is None or model.state is not ModelState.READY:
                        current[version] = await self._load_version(entry, version)
                        self._publish()
            except ServiceError as error:
                self._failures[name] = str(error)
                if not current:
                    del self.models[name]
                raise
            self._failures.pop(name, None)
            self._unloaded.pop(name, None)
            for version in [v for v in current if v not in wanted]:
                self._retire_in_background(name, version)

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
            store=self.store,
            durability=self.durability,
            quota=self.policy if self.policy.limits_sequences else None,
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
        """Stop taking new sequences on every version of `name`; retire them in the background."""
        async with self._lock:
            versions = self.models.get(name)
            if not versions:
                raise ModelNotFound(f"model {name!r} is not loaded")
            self._unloaded[name] = "unloaded by request"
            for version in list(versions):
                self._retire_in_background(name, version)

    def _retire_in_background(self, name: str, version: int) -> None:
        model = self.models[name][version]
        model.state = ModelState.UNLOADING
        logger.info(
            "unloading model %s version %d: no new sequences; %d live ones may go on for %g s",
            name,
            version,
            model.live_sequences,
            self.unload_grace_s,
        )
        task = asyncio.create_task(self._retire(model), name=f"unload-{name}-{version}")
        self._retiring[model] = task

        def retired(done: asyncio.Task[None]) -> None:
            if self._retiring.get(model) is done:
                del self._retiring[model]

        task.add_done_callback(retired)

    def _keep(self, model: ServedModel) -> None:
        """Call off the retirement of a version still in its unload grace (a load came)."""
        task = self._retiring.pop(model, None)
        if task is not None:
            task.cancel()
        model.state = ModelState.READY
        logger.info("model %s version %d loaded again; it was unloading", model.name, model.version)

    async def _retire(self, model: ServedModel) -> None:
        await model.retire(self.unload_grace_s)
        versions = self.models.get(model.name, {})
        if versions.get(model.version) is model:
            del versions[model.version]
            if not versions:
                del self.models[model.name]
            self._publish()
        logger.info("unloaded model %s version %d", model.name, model.version)

    # ------------------------------------------------------------------ shutting down
    def stop_admitting(self, hand_over: bool) -> None:
        """Refuse new sequences from now on; with `hand_over`, every stateful request too."""
        self.admission = Admission.HANDING_OVER if hand_over else Admission.DRAINING

    async def quiesce(self, timeout_s: float) -> bool:
        """Wait until no step is queued or running (up to `timeout_s`); whether that happened."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(m.busy for m in self.all_models()):
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def mark_moving(self, ttl_s: float) -> None:
        """Mark in the state store the live states a hand-over is about to write."""
        for model in self.all_models():
            try:
                await model.mark_moving(ttl_s)
            except ServiceError as error:
                logger.error("hand-over of model %s not announced: %s", model.name, error)

    async def write_states(self) -> int:
        """Write every live state to the state store where durability asks; how many were."""
        written = 0
        for model in self.all_models():
            try:
                written += await model.write_states()
            except ServiceError as error:
                logger.error(
                    "states of model %s version %d not handed over: %s",
                    model.name,
                    model.version,
                    error,
                )
        return written

    async def stop(self) -> None:
        """Stop every model (after the work queued on it ran)."""
        for task in list(self._retiring.values()):
            task.cancel()
        await asyncio.gather(*(m.stop() for m in self.all_models()))

    def evict_idle(self, now: float | None = None) -> int:
        """Evict the sequences idle for over their model's idle timeout at `now`
        (`time.monotonic()` seconds; the current time when None); how many were."""
        evicted = 0
        for model in self.all_models():
            gone = model.evict_idle(now)
            if gone:
                evicted += gone
                logger.info(
                    "evicted %d idle sequences of model %s version %d",
                    gone,
                    model.name,
                    model.version,
                )
        return evicted
