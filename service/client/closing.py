"""What the clients share as context managers: `with` closes, `async with` opens and closes."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """`with x:` gives x and calls `x.close()` on the way out, whatever happened."""

    def close(self) -> None:
        """Release what the object holds."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosing:
    """`async with x:` gives `await x.open()` and awaits `x.close()` on the way out."""

    async def open(self) -> Self:
        """Connect; the object itself."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the object holds."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()
