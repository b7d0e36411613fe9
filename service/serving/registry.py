"""The models being served: which requests go to which version, and shutting down.

What a model serves changes only through its `ModelLife` (serving/lifecycle.py): loads,
unloads, polls and the removal of unloaded versions, one at a time per model, with tombstones
for what ended and why.

Version rule: a request that names a version gets that version; one that does not gets the
sequence's own version when it continues a live sequence, otherwise the latest ready version.
A live sequence thus stays on the version it started with until it ends; a continuation of a
sequence whose version was unloaded since is told so (NOT_FOUND).

Unload rule: an unloaded version (by RepositoryModelUnload, or by a load that drops it) takes
no new sequences at once (new ones go to the latest remaining version); its live sequences
may go on for up to `unload_grace_s` seconds, in the background; after that the rest are ended,
and their next request fails saying the version was unloaded.

Shutdown rule (`Admission`): draining, the registry refuses new sequences and requests without
one, and lets live sequences go on; handing over (with a shared state store), it refuses every
request in a sequence too, so that clients continue on another replica.

The registry runs on the event loop; `snapshot()` and `all_models()` may be called from any
thread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.batching.batcher import Turn
from rnnserve.errors import (
    InvalidArgument,
    ModelNotFound,
    ModelNotReady,
    ServiceError,
    ShuttingDown,
)
from rnnserve.repository.layout import ModelEntry, folders, model_folder
from rnnserve.runtime.base import Runtime
from rnnserve.serving.lifecycle import ModelLife
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
        self.turn = Turn()
        """Where every model's inline runs wait for the end of the callback that submitted them
        (a transport may run them at the end of its own: `Turn.run`)."""
        self._lives: dict[str, ModelLife] = {}
        # Every served version, replaced whole on each change: another thread reads it as it is.
        self._published: tuple[ServedModel, ...] = ()

    # ------------------------------------------------------------------ lookups
    def lone(self) -> bool:
        """Whether the server holds one live sequence at most, over every model served: a lone
        sequence's requests then run on the event loop, and its model calls may take both
        threads (`ServedModel`). Any thread (it reads the published models as they are)."""
        count = 0
        for model in self._published:
            if model.sequences is not None:
                count += len(model.sequences.manager.live)
                if count > 1:
                    return False
        return True

    @property
    def ready(self) -> bool:
        """Whether the server takes new work: models are loaded and it is not shutting down."""
        return self.admission is Admission.OPEN and bool(self._published)

    def resolve(self, request: InferenceRequest) -> ServedModel:
        """The model version that serves `request` (the version rule, the shutdown rule).

        Raises ShuttingDown, ModelNotFound (also for a sequence whose version was unloaded),
        ModelNotReady, SequenceNotFound (one that ended on a version unloaded since) or
        InvalidArgument.
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
        life = self._lives.get(request.model)
        if control.id and life is not None:
            if control.start:
                life.started(control.id, request.principal)
            elif not request.version:
                model = life.continuing(control.id, request.principal, self.store.shared)
                if model is not None:
                    return model
        return self.get(request.model, request.version)

    def get(self, name: str, version: str = "", any_state: bool = False) -> ServedModel:
        """Version `version` of model `name`, or when empty its latest ready version (with
        `any_state`, its latest loaded one, as metadata and statistics describe it).

        Raises ModelNotFound (never loaded, unloaded, or no such version served),
        ModelNotReady (loading, failed to load, or every version being unloaded) or
        InvalidArgument (a version that is not a number).
        """
        life = self._lives.get(name)
        versions = life.versions if life is not None else {}
        if not versions:
            raise self._not_served(name, life)
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
                assert life is not None  # it has versions
                why = life.version_ended(int(version))
                if why:
                    raise ModelNotFound(
                        f"model {name} version {version} was unloaded ({why}); loaded versions: "
                        f"{served}"
                    )
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

    def _not_served(self, name: str, life: ModelLife | None) -> ServiceError:
        """Why model `name` serves no version now."""
        if life is not None and life.loading:
            return ModelNotReady(
                f"model {name} is being loaded; it serves once its RepositoryModelLoad answers "
                f"(ModelReady turns true)"
            )
        if life is not None and life.failure:
            return ModelNotReady(f"model {name} is not ready: {life.failure}")
        if life is not None and life.unloaded:
            return ModelNotFound(
                f"model {name} was unloaded ({life.unloaded}); load it again with "
                f"RepositoryModelLoad"
            )
        known = ", ".join(sorted({m.name for m in self._published})) or "none"
        return ModelNotFound(f"unknown model {name!r}; models being served: {known}")

    def versions(self, name: str) -> list[int]:
        """The loaded versions of model `name`, ascending (none when it is not loaded)."""
        life = self._lives.get(name)
        return sorted(life.versions) if life is not None else []

    def all_models(self) -> tuple[ServedModel, ...]:
        """Every loaded version (safe from any thread)."""
        return self._published

    def snapshot(self) -> list[ModelSnapshot]:
        """The figures of every loaded version, as they are now (safe from any thread)."""
        return [model.snapshot() for model in self._published]

    def _publish(self) -> None:
        self._published = tuple(
            model for _, life in sorted(self._lives.items()) for model in life.versions.values()
        )

    def index(self) -> list[IndexEntry]:
        """RepositoryIndex: every model on disk or loaded, with its state: each served
        version READY or UNLOADING, each version a load is loading LOADING; else one row,
        UNAVAILABLE with why its load failed, or UNLOADED."""
        entries: list[IndexEntry] = []
        try:
            on_disk = set(folders(self.repository))
        except ServiceError:
            on_disk = set()
        for name in sorted(on_disk | set(self._lives)):
            life = self._lives.get(name)
            if life is None:
                entries.append(IndexEntry(name, "", "UNLOADED", ""))
                continue
            for version, model in sorted(life.versions.items()):
                entries.append(IndexEntry(name, str(version), model.state.value, ""))
            for version in life.loading:
                if version not in life.versions:
                    entries.append(IndexEntry(name, str(version), "LOADING", ""))
            if not life.versions and not life.loading:
                state = "UNAVAILABLE" if life.failure else "UNLOADED"
                entries.append(IndexEntry(name, "", state, life.failure or life.unloaded))
        return entries

    # ------------------------------------------------------------------ changes
    def _life(self, name: str) -> ModelLife:
        """The life of model `name`, the one path its changes take (made on first need: only
        for a model with a folder, or one loaded already). Raises ModelNotFound, or
        InvalidModelRepository when the repository is not a directory."""
        life = self._lives.get(name)
        if life is None:
            if model_folder(self.repository, name) is None:
                raise ModelNotFound(
                    f"no model {name!r} in repository {self.repository} (a folder with "
                    f"config.pbtxt and a numbered version folder holding the model file)"
                )
            life = ModelLife(
                name, self.repository, self.unload_grace_s, self._load_version, self._publish
            )
            self._lives[name] = life
        return life

    async def load_all(self) -> None:
        """Load every model of the repository (at start); one that fails, its config.pbtxt
        unreadable too, is reported and left out, the others are served. Raises
        InvalidModelRepository when the repository is not a directory."""
        for name in folders(self.repository):
            try:
                await self._life(name).load()
            except ServiceError as error:
                logger.error("model %s not loaded: %s", name, error)

    async def poll(self) -> None:
        """One repository poll (--repository-poll-s): load every model as `load` does (new
        models and versions join, versions that left the folder or its policy are unloaded),
        but a model unloaded by request stays unloaded until it is loaded by request again;
        unload the models whose folder left the repository. Each failure is logged once.

        Raises InvalidModelRepository when the repository is not a directory.
        """
        on_disk = folders(self.repository)
        for name in on_disk:
            known = self._lives.get(name)
            before = known.failure if known is not None else ""
            try:
                await self._life(name).load(by_poll=True)
            except ServiceError as error:
                if str(error) != before:  # the same failure as at the last poll: said already
                    logger.error("model %s not loaded: %s", name, error)
        for name, life in list(self._lives.items()):
            if name not in on_disk and life.versions:
                try:
                    await life.unload("its folder left the repository", by_poll=True)
                except ModelNotFound:
                    pass  # unloaded meanwhile
                except ServiceError as error:  # its folder came back, unreadable
                    logger.error("model %s not unloaded: %s", name, error)

    async def load(self, name: str) -> None:
        """Load (or reload) a model from the repository by its folder name: when this returns,
        it serves exactly the versions its folder asks for (serving/lifecycle.py).

        Raises ModelNotFound, InvalidArgument, InvalidModelRepository, ModelNotReady or
        ShuttingDown (see `ModelLife.load`).
        """
        await self._life(name).load()

    async def unload(self, name: str) -> None:
        """Stop taking new sequences on every version of `name`; retire them in the background.
        Raises ModelNotFound when it is not loaded."""
        life = self._lives.get(name)
        if life is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        await life.unload()

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
            turn=self.turn,
            server_lone=self.lone,
        )
        model.start()
        return model

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
        """Stop every model (after the work queued on it ran); take no change from now on."""
        models = [model for life in self._lives.values() for model in life.close()]
        await asyncio.gather(*(model.stop() for model in models))

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
