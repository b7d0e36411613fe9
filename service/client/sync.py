"""The blocking client, for scripts and notebooks: the asyncio client run on an event loop in a
background thread.

    with SyncClient("127.0.0.1:8001") as client, client.session("charlm_lstm") as s:
        logits = s.step(tokens)

One implementation serves both (the async Client), so both behave alike: sessions share one
stream, retry the same way and raise the same errors. A loop of its own also keeps the
client working inside a notebook, whose own event loop is already running.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from rnnserve.client.aio import Client, Health, ModelInfo, RetryPolicy, Session
from rnnserve.client.closing import Closing

T = TypeVar("T")


class SyncClient(Closing):
    """Client (rnnserve.client.aio) with blocking methods; the same arguments."""

    def __init__(self, url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rnnserve-client", daemon=True
        )
        self._thread.start()
        self._client = Client(url, **options)
        try:
            self._run(self._client.open())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def url(self) -> str:
        """The server's address."""
        return self._client.url

    @property
    def retry(self) -> RetryPolicy:
        """How steps are retried (see Session)."""
        return self._client.retry

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def health(self) -> Health:
        """See Client.health."""
        return self._run(self._client.health())

    def model_info(self, model: str, version: str = "") -> ModelInfo:
        """See Client.model_info."""
        return self._run(self._client.model_info(model, version))

    def models(self) -> list[ModelInfo]:
        """See Client.models."""
        return self._run(self._client.models())

    def session(self, model: str, **options: Any) -> SyncSession:
        """An opened session (see Client.session and Session); close it, or use `with`."""
        session = self._client.session(model, **options)
        self._run(session.open())
        return SyncSession(self, session)

    def close(self) -> None:
        """Close the client, then stop its event loop thread."""
        if self._thread.is_alive():
            try:
                self._run(self._client.close())
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class SyncSession(Closing):
    """Session (rnnserve.client.aio) with blocking methods."""

    def __init__(self, client: SyncClient, session: Session) -> None:
        self._client = client
        self.session = session

    @property
    def info(self) -> ModelInfo:
        """The model's inputs, outputs and states."""
        assert self.session.info is not None
        return self.session.info

    @property
    def sequence_id(self) -> int | str | None:
        """The server-side sequence's id (None with explicit state)."""
        return self.session.sequence_id

    @property
    def sequence_version(self) -> int | None:
        """How many requests the server says the sequence has advanced through."""
        return self.session.sequence_version

    @property
    def state(self) -> dict[str, np.ndarray] | None:
        """See Session.state."""
        return self.session.state

    @state.setter
    def state(self, value: Mapping[str, ArrayLike] | None) -> None:
        self.session.state = value

    def step(self, x: ArrayLike | Mapping[str, ArrayLike], *, end: bool = False) -> np.ndarray:
        """See Session.step."""
        return self._client._run(self.session.step(x, end=end))

    def infer(
        self, x: ArrayLike | Mapping[str, ArrayLike], *, end: bool = False
    ) -> dict[str, np.ndarray]:
        """See Session.infer."""
        return self._client._run(self.session.infer(x, end=end))

    def close(self) -> None:
        """See Session.close."""
        self._client._run(self.session.close())
