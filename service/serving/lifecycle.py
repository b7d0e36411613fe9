"""One model's life: every change to what it serves, one at a time, and what ended and why.

Every change to what a model serves runs under the model's own lock, one after another in the
order asked for (asyncio's lock is fair): a load (RepositoryModelLoad, the load at start, a
repository poll), an unload, and the final removal of a version whose unload grace ran out. No
change sees another half done, and none is made outside this path.

- A load reads the model's folder when its turn comes and loads every version the folder's
  `version_policy` asks for that is not served, or whose files changed (its config.pbtxt, or
  its model file); only then does what is served change, all at once: the new versions join,
  versions still in their unload grace that the policy asks for again are kept (their live
  sequences go on), and versions it no longer asks for are unloaded, as are the instances
  whose files changed (their live sequences finish on them, new ones start on the new files).
  A load that fails, or is cancelled, changes nothing: what it loaded is stopped and the model
  serves what it served before. When a load answers, the model serves exactly the versions the
  folder asks for.
- An unload takes no new sequences on any version from then on. Each version's live sequences
  go on for the unload grace (longer only while a change of the same model is under way: it
  may keep the version); then the rest are ended, the version stops being served, and only
  then does it stop, once the work queued on it ran. A load asked for meanwhile loads the
  version afresh.
- A poll loads like a load, but leaves out a model unloaded by request (until it is loaded by
  request again), and unloads a model whose folder left the repository.
- Tombstones: why each removed version stopped being served, and why each sequence a removed
  version held ended (the unload, or before it: its END, or its idle timeout). A continuation of
  such a sequence is told so (NOT_FOUND naming the version that was unloaded), not "never
  started" by the version that serves now.

Event loop only; `versions` is replaced whole on each change.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.errors import (
    InvalidArgument,
    InvalidModelRepository,
    ModelNotFound,
    SequenceNotFound,
    ServiceError,
    ShuttingDown,
)
from rnnserve.repository.layout import ModelEntry, find, model_folder
from rnnserve.serving.model import ModelState, ServedModel
from rnnserve.sessions.sequence import SequenceId, SequenceKey, sequence_key

logger = logging.getLogger(__name__)

LoadVersion = Callable[[ModelEntry, int], Awaitable[ServedModel]]
"""Loads one version of a model folder and starts it; raises the ServiceError that failed it."""

Source = tuple[bytes, int, int, int]
"""What a version was loaded from: its config (serialized, but for `version_policy`) and its
model file's inode, size and modification time (ns). Another source on disk means the
version's files changed."""

REMEMBERED_SEQUENCES = 100_000
"""Sequences of removed versions a model remembers the ending of (the oldest are forgotten)."""


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


def source_of(entry: ModelEntry, version: int) -> Source:
    """What `version` of `entry` would be loaded from now. Raises InvalidModelRepository when
    its model file cannot be read."""
    path = entry.model_file(version)
    try:
        stat = path.stat()
    except OSError as error:
        raise InvalidModelRepository(f"model {entry.name}: cannot read {path}: {error}") from error
    config = mc.ModelConfig()
    config.CopyFrom(entry.config)
    config.ClearField("version_policy")  # which versions load, not how each runs
    return config.SerializeToString(deterministic=True), stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class Ending:
    """Why a sequence of a removed version stopped being live."""

    version: int
    why: str
    unloaded: bool
    """It was live when its version's unload grace ran out."""


class ModelLife:
    """The versions one model serves and every change to them (see the module docstring)."""

    def __init__(
        self,
        name: str,
        repository: Path,
        grace_s: float,
        load_version: LoadVersion,
        on_change: Callable[[], None],
    ) -> None:
        self.name = name
        self.versions: dict[int, ServedModel] = {}
        """The served versions: READY, or UNLOADING while in their unload grace."""
        self.loading: tuple[int, ...] = ()
        """The versions a load is loading now (not served yet)."""
        self.failure = ""
        """Why its last load failed; empty once one succeeded."""
        self.unloaded = ""
        """Why it was unloaded, while it is not loaded again."""
        self._repository = repository
        self._grace_s = grace_s
        self._load_version = load_version
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self._held_off = False  # unloaded by request: polls leave it out
        self._closed = False
        self._retiring: dict[ServedModel, asyncio.Task[None]] = {}
        self._draining: set[ServedModel] = set()
        self._sources: dict[ServedModel, Source] = {}
        self._ended_versions: dict[int, str] = {}
        self._ended_sequences: OrderedDict[SequenceKey, Ending] = OrderedDict()

    # ------------------------------------------------------------------ changes
    async def load(self, by_poll: bool = False) -> None:
        """Serve exactly the versions the model's folder asks for, as it is when this change's
        turn comes (see the module docstring); `by_poll`: not if unloaded by request.

        Raises ModelNotFound (no such folder), InvalidArgument (no version folder with a model
        file), InvalidModelRepository (a config that cannot be read or served), ModelNotReady
        (a version failed to load) or ShuttingDown; the model then serves what it did before.
        """
        async with self._lock:
            if by_poll and self._held_off:
                return
            self._refuse_when_closed()
            try:
                entry = find(self._repository, self.name)
                if entry is None:
                    raise ModelNotFound(
                        f"no model {self.name!r} in repository {self._repository} (a folder "
                        f"with config.pbtxt and a numbered version folder holding the model file)"
                    )
                wanted = versions_to_serve(entry)
                if not wanted:
                    raise InvalidArgument(
                        f"model {self.name} has no version folder with a model file"
                    )
                sources = {version: source_of(entry, version) for version in wanted}
                stale = [
                    version
                    for version in wanted
                    if version not in self.versions
                    or self._sources.get(self.versions[version]) != sources[version]
                ]
                staged = await self._stage(entry, stale)
            except (ModelNotFound, ShuttingDown):
                raise
            except ServiceError as error:
                self.failure = str(error)
                raise
            if self._closed:
                await _stop_unserved(staged)
                self._refuse_when_closed()
            self._commit(wanted, staged, sources)

    async def unload(self, why: str = "unloaded by request", by_poll: bool = False) -> None:
        """Take no new sequences on any version from now on; each is removed once its unload
        grace is over (see the module docstring). `by_poll`: only while the model's folder is
        still missing, and polls may load it again.

        Raises ModelNotFound when no version is served.
        """
        async with self._lock:
            if by_poll and model_folder(self._repository, self.name) is not None:
                return
            if not self.versions:
                raise ModelNotFound(f"model {self.name!r} is not loaded")
            self.unloaded = why
            self._held_off = not by_poll
            for model in self.versions.values():
                if model not in self._retiring:  # unloading already: its grace goes on
                    self._retire(model, why)
            self._on_change()

    async def _stage(self, entry: ModelEntry, versions: list[int]) -> dict[int, ServedModel]:
        """Load `versions`, none of them served yet; on any failure stop those loaded."""
        staged: dict[int, ServedModel] = {}
        self.loading = tuple(versions)
        try:
            for version in versions:
                staged[version] = await self._load_version(entry, version)
        except BaseException:  # cancelled too: what was loaded must not outlive the load
            await _stop_unserved(staged)
            raise
        finally:
            self.loading = ()
        return staged

    def _commit(
        self, wanted: list[int], staged: dict[int, ServedModel], sources: dict[int, Source]
    ) -> None:
        """Serve `wanted`: `staged` join (replacing instances whose files changed), kept ones
        stay, the others unload. Never awaits."""
        for version, model in staged.items():
            self._sources[model] = sources[version]
            replaced = self.versions.get(version)
            if replaced is not None and replaced not in self._retiring:
                self._retire(replaced, f"version {version} was loaded again: its files changed")
        versions = {**self.versions, **staged}
        for version in wanted:
            model = versions[version]
            if model.state is ModelState.UNLOADING:
                self._keep(model)
            self._ended_versions.pop(version, None)
        served = ", ".join(map(str, wanted))
        why = f"a load of the model serves version{'s' if len(wanted) > 1 else ''} {served}"
        for version, model in versions.items():
            if version not in wanted and model not in self._retiring:
                self._retire(model, why)
        self.versions = versions
        self.failure = self.unloaded = ""
        self._held_off = False
        self._on_change()
        for model in staged.values():
            logger.info(
                "loaded model %s version %d provider=%s streamable=%s",
                self.name,
                model.version,
                model.runtime.provider,
                model.signature.streamable,
            )

    def _retire(self, model: ServedModel, why: str) -> None:
        model.state = ModelState.UNLOADING
        logger.info(
            "unloading model %s version %d (%s): no new sequences; %d live ones may go on for %g s",
            self.name,
            model.version,
            why,
            model.live_sequences,
            self._grace_s,
        )
        self._retiring[model] = asyncio.create_task(
            self._retirement(model, why), name=f"unload-{self.name}-{model.version}"
        )

    def _keep(self, model: ServedModel) -> None:
        """Call off the retirement of a version in its unload grace: a load asks for it."""
        task = self._retiring.pop(model, None)
        if task is not None:
            task.cancel()
        model.state = ModelState.READY
        logger.info("model %s version %d loaded again; it was unloading", self.name, model.version)

    async def _retirement(self, model: ServedModel, why: str) -> None:
        """The grace, then the removal (a change like any other), then the final drain."""
        await model.wait_for_sequences(self._grace_s)
        async with self._lock:
            if self._retiring.get(model) is not asyncio.current_task():
                return  # a load kept it while this waited for its turn
            del self._retiring[model]
            self.versions = {v: m for v, m in self.versions.items() if m is not model}
            self._sources.pop(model, None)
            self._bury(model, why)
            self._draining.add(model)
            self._on_change()
        try:
            await model.stop()  # outside the lock: a load may bring the version back meanwhile
        finally:
            self._draining.discard(model)
        logger.info("unloaded model %s version %d", self.name, model.version)

    def _bury(self, model: ServedModel, why: str) -> None:
        """End the version's live sequences; remember why they, and it, ended."""
        if model.version not in self.versions:  # else another instance serves it
            self._ended_versions[model.version] = why
        told = f"version {model.version} of model {self.name} was unloaded ({why})"
        unloaded = model.end_sequences(told)
        for key, ending in model.endings():
            self._remember(key, Ending(model.version, ending, unloaded=False))
        for key in unloaded:
            self._remember(key, Ending(model.version, why, unloaded=True))

    def _remember(self, key: SequenceKey, ending: Ending) -> None:
        ended = self._ended_sequences
        ended[key] = ending
        ended.move_to_end(key)
        while len(ended) > REMEMBERED_SEQUENCES:
            ended.popitem(last=False)

    # ------------------------------------------------------------------ lookups
    def continuing(self, sequence_id: SequenceId, owner: str, adopt: bool) -> ServedModel | None:
        """The version a continuation that names none goes to: the one holding the sequence,
        else (`adopt` false: no shared store to adopt it from) the one that remembers why it
        ended; None for the latest ready version.

        Raises ModelNotFound when its version was unloaded with it live, SequenceNotFound when
        it ended on a version removed since.
        """
        newest_first = [m for _, m in sorted(self.versions.items(), reverse=True)]
        newest_first += [m for m in self._retiring if m not in newest_first]  # files changed
        for model in newest_first:
            if model.holds(sequence_id, owner):
                return model
        if adopt:  # another replica may hold it, or have started the id again
            return None
        key = sequence_key(owner, sequence_id)
        for model in newest_first:
            if model.ending(key) is not None:
                return model  # its manager refuses it, saying why
        ending = self._ended_sequences.get(key)
        if ending is None:
            return None
        if not ending.unloaded:
            raise SequenceNotFound(
                f"sequence {sequence_id!r} of model {self.name} (version {ending.version}, "
                f"unloaded since) is not live ({ending.why}); send sequence_start=true to begin "
                f"it"
            )
        again = (
            "send sequence_start=true to begin it again"
            if self.versions
            else "load the model again with RepositoryModelLoad, then send sequence_start=true"
        )
        raise ModelNotFound(
            f"sequence {sequence_id!r} of model {self.name} was ended when version "
            f"{ending.version} was unloaded ({ending.why}) and its unload grace of "
            f"{self._grace_s:g} s ran out; {again}"
        )

    def started(self, sequence_id: SequenceId, owner: str) -> None:
        """A START for the sequence arrived: its old ending no longer answers for it."""
        if self._ended_sequences:
            self._ended_sequences.pop(sequence_key(owner, sequence_id), None)

    def version_ended(self, version: int) -> str | None:
        """Why `version` stopped being served; None when it never was, or is again."""
        return self._ended_versions.get(version)

    # ------------------------------------------------------------------ shutting down
    def close(self) -> list[ServedModel]:
        """Take no change from now on (a load under way is refused when it ends); call off the
        retirements in their grace. Every version to stop: served or draining."""
        self._closed = True
        retiring = [model for model in self._retiring if model not in self.versions.values()]
        for task in self._retiring.values():
            task.cancel()
        self._retiring.clear()
        return [*self.versions.values(), *retiring, *self._draining]

    def _refuse_when_closed(self) -> None:
        if self._closed:
            raise ShuttingDown(f"the server is shutting down; model {self.name} was not loaded")


async def _stop_unserved(models: dict[int, ServedModel]) -> None:
    """Stop versions loaded but never served, and let go of them (the error that ends the load
    holds its frames, and so this dict): nothing was queued on them, so this never waits, and
    completes even in a task being cancelled."""
    for model in models.values():
        await model.stop()
    models.clear()
