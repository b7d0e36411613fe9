"""Every change to what a model serves, interleaved with the others, forced deterministically:
a slow runtime factory holds a load where the test wants it, and a held model call holds a
version's final drain. Real ONNX Runtime sessions, real repository folders.

Each test checks what a client would hear (the answer, its status and message, readiness) and
that nothing outlives what is served: no ONNX Runtime session, no batch thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import threading
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from rnnserve.errors import (
    ModelNotFound,
    ModelNotReady,
    SequenceNotFound,
    ServiceError,
    ShuttingDown,
)
from rnnserve.models.publish import parse_config, render_config
from rnnserve.runtime.base import Runtime
from rnnserve.serving.model import Limits, ModelState
from rnnserve.serving.registry import ModelRegistry
from rnnserve.serving.request import InferenceRequest, InferenceResult, SequenceControl
from tests.factories import publish_versions, run_onnx
from tests.serving.test_model import WAIT_S, cpu_runtime, until

MODEL = "gru"
X = np.random.default_rng(0).standard_normal((1, 4, 3)).astype(np.float32)
"""One sequence's input: its first requests take two steps, later ones the rest."""


class Gated:
    """A real runtime whose calls wait while `go` is clear: holds a version's final drain."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inner = cpu_runtime(path)
        self.provider = self.inner.provider
        self.inputs = self.inner.inputs
        self.outputs = self.inner.outputs
        self.index_bounds = self.inner.index_bounds
        self.go = threading.Event()
        self.go.set()
        self.running = threading.Event()

    def run(
        self, feeds: Mapping[str, np.ndarray], work: int | None = None, alone: bool = False
    ) -> dict[str, np.ndarray]:
        self.running.set()
        assert self.go.wait(WAIT_S), "the test never let the call go"
        return self.inner.run(feeds, work, alone)


class SlowFactory:
    """The runtime factory: a held call (every version, or the one `hold` names) waits on its
    thread until `go` is set; a version in `broken` fails. Remembers what it made."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.go.set()
        self.held_version: int | None = None
        self.waiting = threading.Event()
        """A held call is waiting."""
        self.calls: list[int] = []
        self.broken: set[int] = set()
        self.made: list[weakref.ref[Gated]] = []

    def hold(self, version: int | None = None) -> None:
        self.held_version = version
        self.waiting.clear()
        self.go.clear()

    def __call__(self, path: Path) -> Runtime:
        version = int(path.parent.name)
        self.calls.append(version)
        if self.held_version in (None, version):
            self.waiting.set()
            assert self.go.wait(WAIT_S), "the test never let the load go"
        if version in self.broken:
            raise RuntimeError(f"version {version} is broken")
        runtime = Gated(path)
        self.made.append(weakref.ref(runtime))
        return runtime


@dataclass
class Lab:
    repository: Path
    factory: SlowFactory
    registries: list[ModelRegistry]

    def bare(self, grace_s: float = 0.0) -> ModelRegistry:
        """A registry that loaded nothing yet. Batches run on the worker thread, never inline:
        a held call must not hold the event loop."""
        registry = ModelRegistry(
            self.repository, self.factory, Limits(inline_max_work=0), unload_grace_s=grace_s
        )
        self.registries.append(registry)
        return registry

    async def loaded(self, grace_s: float = 0.0) -> ModelRegistry:
        registry = self.bare(grace_s)
        await registry.load_all()
        return registry

    def model_file(self, version: int) -> Path:
        return self.repository / MODEL / str(version) / "model.onnx"


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    """A repository holding version 1 of MODEL, and the slow factory; every registry made is
    stopped after the test."""
    repository = tmp_path / "repository"
    publish_versions(repository, MODEL, {1: 1})
    made = Lab(repository, SlowFactory(), [])
    yield made
    made.factory.go.set()
    for registry in made.registries:
        await registry.stop()


def step(
    sequence: int, x: np.ndarray = X[:, :2], start: bool = False, end: bool = False, version=""
) -> InferenceRequest:
    return InferenceRequest(
        MODEL,
        {"x": x},
        version=version,
        outputs=("y",),
        sequence=SequenceControl(sequence, start=start, end=end),
    )


async def infer(registry: ModelRegistry, request: InferenceRequest) -> InferenceResult:
    """What a client hears: its request resolved to a version and run there."""
    return await registry.resolve(request).infer(request)


async def refusal(registry: ModelRegistry, request: InferenceRequest) -> ServiceError:
    """The error a request is answered with (it must be refused)."""
    try:
        result = await infer(registry, request)
    except ServiceError as error:
        return error.with_traceback(None)  # its frames would hold versions alive
    raise AssertionError(f"answered, by version {result.version}")


async def assert_continues_exactly(registry: ModelRegistry, sequence: int, version: int) -> None:
    """A new sequence runs on `version`, request after request, as its file runs it whole."""
    path = registry.get(MODEL).path
    first = await infer(registry, step(sequence, X[:, :2], start=True))
    rest = await infer(registry, step(sequence, X[:, 2:], end=True))
    assert (first.version, rest.version) == (version, version)
    joined = np.concatenate([first.outputs["y"], rest.outputs["y"]], axis=1)
    np.testing.assert_allclose(joined, run_onnx(path, X), rtol=1e-5, atol=1e-5)


def batch_threads(version: int | None = None) -> list[str]:
    prefix = f"batch-{MODEL}-{'' if version is None else f'{version}_'}"
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


async def assert_nothing_outlives_what_is_served(
    registry: ModelRegistry, factory: SlowFactory
) -> None:
    """Every runtime the factory made is a served version's, or freed; every batch thread is
    a served version's (a version being stopped is given the time to stop)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while (left := outliving(registry, factory)) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert not left, left


def outliving(registry: ModelRegistry, factory: SlowFactory) -> list[str]:
    """What is alive of a version that is not served."""
    gc.collect()
    served = registry.all_models()
    runtimes = {id(model.runtime) for model in served}
    threads = {f"batch-{model.name}-{model.version}" for model in served}
    alive = [runtime for ref in factory.made if (runtime := ref()) is not None]
    return [f"the runtime of {r.path}" for r in alive if id(r) not in runtimes] + [
        f"thread {name}" for name in batch_threads() if name.rsplit("_", 1)[0] not in threads
    ]


async def test_a_replaced_versions_sequences_are_told_why_they_ended(lab: Lab) -> None:
    registry = await lab.loaded(grace_s=3.0)
    first = await infer(registry, step(7, X[:, :2], start=True))
    await infer(registry, step(8, start=True))
    publish_versions(lab.repository, MODEL, {2: 2})
    await registry.load(MODEL)
    assert registry.get(MODEL).version == 2

    # In the grace: 8 ends on version 1, and is then told so; 7 goes on, on version 1.
    await infer(registry, step(8, X[:, :1], end=True))
    ended = await refusal(registry, step(8))
    assert isinstance(ended, SequenceNotFound), ended
    assert "(version 1)" in str(ended) and "it ended" in str(ended)
    second = await infer(registry, step(7, X[:, 2:3]))
    assert second.version == 1
    joined = np.concatenate([first.outputs["y"], second.outputs["y"]], axis=1)
    np.testing.assert_allclose(joined, run_onnx(lab.model_file(1), X[:, :3]), atol=1e-5)

    await until(lambda: registry.versions(MODEL) == [2])
    gone = await refusal(registry, step(7, X[:, 3:]))
    assert isinstance(gone, ModelNotFound), gone  # NOT_FOUND, as the README promises
    assert "sequence 7 of model gru was ended when version 1 was unloaded" in str(gone)
    assert "send sequence_start=true" in str(gone)
    ended = await refusal(registry, step(8))
    assert isinstance(ended, SequenceNotFound), ended
    assert "(version 1, unloaded since) is not live (it ended)" in str(ended)
    named = await refusal(registry, step(9, start=True, version="1"))
    assert isinstance(named, ModelNotFound), named
    assert "model gru version 1 was unloaded (a load of the model serves version 2)" in str(named)

    await assert_continues_exactly(registry, 7, version=2)  # the id begins again, on version 2
    fresh = await refusal(registry, step(7))
    assert isinstance(fresh, SequenceNotFound) and "(version 2)" in str(fresh), fresh
    await assert_nothing_outlives_what_is_served(registry, lab.factory)


@pytest.mark.parametrize("new_version", [False, True], ids=["same-version", "new-version"])
async def test_a_load_overlapping_a_versions_final_drain_serves_what_the_repository_holds(
    lab: Lab, new_version: bool
) -> None:
    registry = await lab.loaded(grace_s=0.0)
    old = registry.get(MODEL)
    await infer(registry, step(5, start=True))
    held = old.runtime
    assert isinstance(held, Gated)
    held.go.clear()
    held.running.clear()
    queued = asyncio.ensure_future(infer(registry, step(5, X[:, 2:3])))
    await until(held.running.is_set)
    await registry.unload(MODEL)
    await until(lambda: old.live_sequences == 0)  # grace over; the drain waits for the call
    if new_version:
        publish_versions(lab.repository, MODEL, {2: 2})
    lab.factory.hold()
    load = asyncio.ensure_future(registry.load(MODEL))
    await until(lab.factory.waiting.is_set)
    held.go.set()
    assert isinstance(await queued, InferenceResult)  # taken before the grace ended: it ran
    await until(lambda: not batch_threads(1))  # the old version stopped
    lab.factory.go.set()
    await load

    expected = 2 if new_version else 1
    assert registry.versions(MODEL) == [expected]
    served = registry.get(MODEL)
    assert served is not old and served.state is ModelState.READY
    old = held = served = None  # the test lets go of them: only what is served may live
    gone = await refusal(registry, step(5))
    assert isinstance(gone, ModelNotFound) and "version 1 was unloaded" in str(gone), gone
    await assert_continues_exactly(registry, 6, expected)
    await assert_nothing_outlives_what_is_served(registry, lab.factory)


@pytest.mark.parametrize("changed", ["model-file", "config"])
async def test_a_load_serves_a_version_whose_files_changed_afresh(
    lab: Lab, tmp_path: Path, changed: str
) -> None:
    registry = await lab.loaded(grace_s=3.0)
    old = registry.get(MODEL)
    before = run_onnx(lab.model_file(1), X)
    first = await infer(registry, step(4, X[:, :2], start=True))
    await registry.load(MODEL)  # nothing changed: nothing is loaded again
    assert registry.get(MODEL) is old and lab.factory.calls == [1]
    if changed == "model-file":  # replaced whole, as a careful operator does
        publish_versions(tmp_path / "elsewhere", MODEL, {1: 9})
        staging = lab.model_file(1).with_suffix(".new")
        shutil.copyfile(tmp_path / "elsewhere" / MODEL / "1" / "model.onnx", staging)
        os.replace(staging, lab.model_file(1))
    else:
        config_path = lab.repository / MODEL / "config.pbtxt"
        config = parse_config(config_path.read_text())
        config.parameters["max_steps_per_request"].string_value = "3"
        config_path.write_text(render_config(config))
    await registry.load(MODEL)

    served = registry.get(MODEL)
    assert served is not old and served.version == 1 and registry.versions(MODEL) == [1]
    assert served.max_steps == (3 if changed == "config" else old.max_steps)
    await assert_continues_exactly(registry, 5, version=1)  # on the new files
    # The live sequence finishes on the instance it started on, within the grace.
    rest = await infer(registry, step(4, X[:, 2:]))
    joined = np.concatenate([first.outputs["y"], rest.outputs["y"]], axis=1)
    np.testing.assert_allclose(joined, before, rtol=1e-5, atol=1e-5)
    old = served = None  # the test lets go of them: only what is served may live
    await assert_nothing_outlives_what_is_served(registry, lab.factory)
    gone = await refusal(registry, step(4))
    assert isinstance(gone, ModelNotFound), gone
    assert "version 1 was loaded again: its files changed" in str(gone)


@pytest.mark.parametrize("kept", [False, True], ids=["dropped", "kept"])
async def test_a_grace_that_ends_during_a_load_waits_for_the_load(lab: Lab, kept: bool) -> None:
    grace_s = 0.3
    registry = await lab.loaded(grace_s=grace_s)
    first = await infer(registry, step(5, X[:, :2], start=True))
    await registry.unload(MODEL)
    publish_versions(lab.repository, MODEL, {2: 2}, policy_all=kept)  # kept: 1 and 2 serve
    lab.factory.hold()
    load = asyncio.ensure_future(registry.load(MODEL))
    await until(lab.factory.waiting.is_set)
    assert (MODEL, "2", "LOADING") in [(e.name, e.version, e.state) for e in registry.index()]
    await asyncio.sleep(grace_s + 0.3)
    # Past the grace, the version stays while the load may still keep it; its sequence too.
    assert registry.resolve(step(5)).version == 1
    lab.factory.go.set()
    await load
    assert registry.get(MODEL).version == 2
    if kept:
        assert registry.versions(MODEL) == [1, 2] and lab.factory.calls == [1, 2]
        assert registry.get(MODEL, "1").state is ModelState.READY
        rest = await infer(registry, step(5, X[:, 2:], end=True))  # it goes on, exactly
        joined = np.concatenate([first.outputs["y"], rest.outputs["y"]], axis=1)
        np.testing.assert_allclose(joined, run_onnx(lab.model_file(1), X), atol=1e-5)
    else:
        await until(lambda: registry.versions(MODEL) == [2])
        gone = await refusal(registry, step(5))
        assert isinstance(gone, ModelNotFound) and "version 1 was unloaded" in str(gone), gone
    await assert_continues_exactly(registry, 6, version=2)
    await assert_nothing_outlives_what_is_served(registry, lab.factory)


async def test_an_unload_asked_for_during_a_load_follows_it_and_readiness_says_loading(
    lab: Lab,
) -> None:
    registry = lab.bare(grace_s=2.0)  # long enough to see it unloading
    lab.factory.hold()
    load = asyncio.ensure_future(registry.load(MODEL))
    await until(lab.factory.waiting.is_set)
    assert not registry.ready  # nothing is served yet
    with pytest.raises(ModelNotReady, match="model gru is being loaded"):
        registry.get(MODEL)
    assert [(e.name, e.version, e.state) for e in registry.index()] == [(MODEL, "1", "LOADING")]
    unload = asyncio.ensure_future(registry.unload(MODEL))
    await asyncio.sleep(0.05)
    assert not unload.done()  # it waits for the load
    lab.factory.go.set()
    await load
    await unload
    assert registry.get(MODEL, any_state=True).state is ModelState.UNLOADING
    with pytest.raises(ModelNotReady, match="being unloaded"):
        registry.get(MODEL)
    await until(lambda: not registry.versions(MODEL))
    with pytest.raises(ModelNotFound, match=r"model gru was unloaded \(unloaded by request\)"):
        registry.get(MODEL)
    assert not registry.ready
    await assert_nothing_outlives_what_is_served(registry, lab.factory)


@pytest.mark.parametrize("fails", [False, True], ids=["loads", "fails"])
async def test_a_load_serves_all_of_its_versions_at_once_or_none(lab: Lab, fails: bool) -> None:
    publish_versions(lab.repository, MODEL, {2: 2}, policy_all=True)
    registry = lab.bare()
    lab.factory.hold(version=2)
    if fails:
        lab.factory.broken.add(2)
    load = asyncio.ensure_future(registry.load(MODEL))
    await until(lab.factory.waiting.is_set)  # version 1 is loaded, version 2 is loading
    with pytest.raises(ModelNotReady, match="being loaded"):
        registry.get(MODEL)
    lab.factory.go.set()
    if fails:
        with pytest.raises(ModelNotReady, match="model gru version 2: cannot load"):
            await load
        assert registry.versions(MODEL) == []
        [entry] = registry.index()
        assert entry.state == "UNAVAILABLE" and "version 2 is broken" in entry.reason
    else:
        await load
        assert registry.versions(MODEL) == [1, 2]
        await assert_continues_exactly(registry, 1, version=2)
    await assert_nothing_outlives_what_is_served(registry, lab.factory)


async def test_two_loads_at_once_load_each_version_once(lab: Lab) -> None:
    registry = lab.bare()
    lab.factory.hold()
    first = asyncio.ensure_future(registry.load(MODEL))
    await until(lab.factory.waiting.is_set)
    publish_versions(lab.repository, MODEL, {2: 2})  # the second load reads the folder later
    second = asyncio.ensure_future(registry.load(MODEL))
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()
    with pytest.raises(ModelNotReady, match="being loaded"):
        registry.get(MODEL)
    lab.factory.go.set()
    await first
    await second
    assert lab.factory.calls == [1, 2]
    assert registry.get(MODEL).version == 2  # what the folder holds when the second answered
    await assert_continues_exactly(registry, 1, version=2)


async def test_a_poll_never_undoes_an_unload_by_request(lab: Lab) -> None:
    publish_versions(lab.repository, "other", {1: 3})
    registry = lab.bare()
    lab.factory.hold()
    other = asyncio.ensure_future(registry.load("other"))
    await until(lab.factory.waiting.is_set)
    load = asyncio.ensure_future(registry.load(MODEL))
    await asyncio.sleep(0.01)
    unload = asyncio.ensure_future(registry.unload(MODEL))
    await asyncio.sleep(0.01)
    poll = asyncio.ensure_future(registry.poll())  # asked for after the unload
    await asyncio.sleep(0.05)
    lab.factory.go.set()
    await asyncio.gather(other, load, unload, poll)
    with pytest.raises((ModelNotReady, ModelNotFound), match="unloaded"):
        registry.get(MODEL)  # no new sequences: unloading, or unloaded already
    await until(lambda: not registry.versions(MODEL))
    await registry.poll()
    assert not registry.versions(MODEL)
    await registry.load(MODEL)  # a load by request lifts it
    await registry.poll()
    assert registry.get(MODEL).state is ModelState.READY


async def test_a_poll_serves_what_the_repository_holds(lab: Lab) -> None:
    registry = await lab.loaded(grace_s=0.0)
    publish_versions(lab.repository, MODEL, {2: 2})
    await registry.poll()
    assert registry.get(MODEL).version == 2
    await until(lambda: registry.versions(MODEL) == [2])
    shutil.rmtree(lab.repository / MODEL)
    await registry.poll()
    await until(lambda: not registry.versions(MODEL))
    with pytest.raises(ModelNotFound, match="its folder left the repository"):
        registry.get(MODEL)
    publish_versions(lab.repository, MODEL, {3: 3})
    await registry.poll()
    assert registry.versions(MODEL) == [3]
    await assert_nothing_outlives_what_is_served(registry, lab.factory)


async def test_an_unreadable_config_fails_its_model_alone(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    broken = lab.repository / "broken"
    broken.mkdir()
    (broken / "config.pbtxt").write_text("this is not a model configuration {")
    registry = await lab.loaded()  # at start
    assert registry.versions(MODEL) == [1]
    rows = {e.name: (e.state, e.reason) for e in registry.index()}
    assert (
        rows["broken"][0] == "UNAVAILABLE"
        and "not a valid model configuration" in rows["broken"][1]
    )
    with pytest.raises(ModelNotReady, match="not a valid model configuration"):
        registry.get("broken")
    publish_versions(lab.repository, MODEL, {2: 2})
    caplog.set_level(logging.ERROR, logger="rnnserve")
    await registry.poll()
    await registry.poll()
    assert registry.get(MODEL).version == 2  # the poll went on past the broken folder
    said = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(said) == 1, said  # at start; the polls saw the same failure: not said again


async def test_unloading_twice_keeps_one_grace(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    registry = await lab.loaded(grace_s=0.3)
    await infer(registry, step(5, start=True))
    caplog.set_level(logging.INFO, logger="rnnserve")
    await registry.unload(MODEL)
    await registry.unload(MODEL)
    await until(lambda: not registry.versions(MODEL))
    await until(lambda: not batch_threads())
    messages = [record.getMessage() for record in caplog.records]
    assert sum(m.startswith("unloading model gru version 1") for m in messages) == 1, messages
    assert messages.count("unloaded model gru version 1") == 1, messages


async def test_a_load_under_way_at_shutdown_leaves_nothing_running(lab: Lab) -> None:
    registry = lab.bare()
    lab.factory.hold()
    load = asyncio.ensure_future(registry.load(MODEL))
    await until(lab.factory.waiting.is_set)
    await registry.stop()
    lab.factory.go.set()
    with pytest.raises(ShuttingDown, match="shutting down"):
        await load
    assert registry.versions(MODEL) == []
    await assert_nothing_outlives_what_is_served(registry, lab.factory)
