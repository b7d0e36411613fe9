"""State stores: where a sequence's state lives beyond one process, and the record it is kept in.

The arena stays the working set: a replica steps the sequences it holds from memory. A store
only sees what durability asks for (see `rnnserve.sessions.sync`), in at most one round trip
per batch and direction. Two stores:

- `memory` (the default): nothing leaves the process; a restart loses every live sequence.
- `redis` (`redis://`, `rediss://`, `unix://`, `redis+sentinel://`): states outlive the
  replica and any replica can continue any sequence (`rnnserve.sessions.redis_store`).

A record is compact binary, never pickle (a store is shared, so what it holds is untrusted):

    offset  0  b"RNNS"          magic
            4  u8 format (1), u8 tensor count, u16 reserved
            8  u64 version      requests the state has advanced through
           16  u64 tag          the sequence's epoch (high 32 bits), random per write (low 32)
           24  per tensor: u8 dtype length, dtype (numpy's `str`, e.g. "<f4"),
                           u8 rank, u32 per dimension, the raw little-endian values

Bytes 8..23 are the record's *stamp*. A write that must not fork a sequence names the stamp it
expects to replace (compare-and-set). The random tag makes a stamp unique to one write, so a
sequence restarted (or forked) elsewhere never repeats a stamp a replica still holds. The
tag's high half is the sequence's *epoch*, drawn at its START and kept by every later write:
a record of the same epoch but an older version than a replica answered is not a restart but
writes the store lost (a failover that did not wait for replicas).

A sequence that ended, or that a replica took over at durability `end`, leaves a *tombstone* in
place of its record: the 24-byte header alone, format 0, its kind in the reserved field. Its
stamp is derived from the stamp of the record it replaced (`Tombstone.after`), so the same
replacement sent twice (a round trip whose reply was lost, sent again) writes the same bytes
and is recognised as already done, where a deletion could not tell itself from someone else's.
"""

from __future__ import annotations

import enum
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import numpy as np

from rnnserve.sessions.sequence import SequenceId

MAGIC = b"RNNS"
FORMAT = 1
_HEADER = struct.Struct("<4sBBHQQ")
STAMP_OFFSET = 8
STAMP_SIZE = 16
_STAMP = struct.Struct("<QQ")
UNCHANGED = b""
"""A read's answer when the stored stamp is the one the reader already holds."""
MOVING = MAGIC + b"\0moving"
"""Put where a state will be, while a replica that shuts down is still writing it (format 0)."""
TOMBSTONE_SIZE = _HEADER.size


class Durability(enum.Enum):
    """When a replica writes sequence states to a shared store."""

    STEP = "step"
    """Before answering each request: an acknowledged step is never lost."""
    END = "end"
    """Only when the replica lets go of its sequences (graceful shutdown): fast, and a crash
    loses the sequences it held."""
    NONE = "none"
    """Never: states live in this replica's memory only."""


class Verify(enum.Enum):
    """How a TLS state store's server certificate is checked."""

    FULL = "full"
    """It chains to the CA certificates given (or the system's) and names the URL's host."""
    NONE = "none"
    """Not at all: the connection is encrypted, but anyone on the path can pose as Redis."""


@dataclass(frozen=True)
class StoreAccess:
    """How to log in to a Redis state store, beyond its URL: a password (or the file that holds
    it) and, for rediss://, the CA certificates to verify it by and a client certificate.

    A URL's own query options (redis-py's `ssl_ca_certs=...`) win over these.
    """

    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    verify: Verify = Verify.FULL


@dataclass(frozen=True, slots=True)
class StoredState:
    """A decoded record: version, tag, and one sequence's state tensors, without the batch axis
    ([layers*directions, H] each)."""

    version: int
    """Requests the state has advanced through (1 after the START request)."""
    tag: int
    tensors: tuple[np.ndarray, ...]

    @property
    def stamp(self) -> bytes:
        """Its 16-byte stamp: version and tag, as bytes 8..23 of its record hold them."""
        return _STAMP.pack(self.version, self.tag)


class Ending(enum.IntEnum):
    """Why a record was replaced by a tombstone (its kind, in the header's reserved field)."""

    ENDED = 1
    """The sequence's END was applied."""
    TAKEN = 2
    """A replica took the sequence over to run it from memory (durability `end`)."""


_ENDED_MASK = 0x454E_4445_445F_5F5F
"""Mixed into an ENDED tombstone's tag: any replica ending the record gives the same tombstone."""


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of a sequence's record once it ended or was taken over."""

    kind: Ending
    version: int
    """The sequence's version when it ended (after its END), or when it was taken."""
    tag: int

    @property
    def stamp(self) -> bytes:
        """Its 16-byte stamp, as for a record."""
        return _STAMP.pack(self.version, self.tag)

    def encode(self) -> bytes:
        """Its 24 bytes (see the module docstring)."""
        return _HEADER.pack(MAGIC, 0, 0, self.kind, self.version, self.tag)

    @classmethod
    def after(cls, kind: Ending, stamp: bytes, token: int = 0) -> Tombstone:
        """The tombstone that replaces the record stamped `stamp`: for ENDED, one version later
        whoever writes it; for TAKEN, at the same version and particular to `token` (the
        replica's own, non-zero), so that only the replica that wrote it recognises it.

        Raises ValueError for a TAKEN tombstone without a token: its stamp would be the
        record's own, and a compare-and-set from that stamp would replace it again."""
        version, tag = _STAMP.unpack(stamp)
        if kind is Ending.ENDED:
            return cls(kind, version + 1, tag ^ _ENDED_MASK)
        if not token:
            raise ValueError("a TAKEN tombstone needs the replica's non-zero token")
        return cls(kind, version, tag ^ token)


def decode_tombstone(data: bytes) -> Tombstone | None:
    """The tombstone `data` holds; None when it holds something else (a record, MOVING)."""
    if len(data) != TOMBSTONE_SIZE:
        return None
    magic, fmt, count, kind, version, tag = _HEADER.unpack(data)
    if magic != MAGIC or fmt != 0 or count != 0:
        return None
    try:
        return Tombstone(Ending(kind), version, tag)
    except ValueError:
        return None


def new_tag(epoch: int | None = None) -> int:
    """A 64-bit tag for the stamp of a record about to be written: the sequence's `epoch` (a
    new random one when None, for a START) above 32 random bits."""
    if epoch is None:
        epoch = secrets.randbits(32)
    return (epoch << 32) | secrets.randbits(32)


def epoch_of(stamp: bytes) -> int:
    """The epoch of the sequence whose record has the 16-byte `stamp` (see the docstring)."""
    return int(_STAMP.unpack(stamp)[1]) >> 32


def encode_state(version: int, tag: int, tensors: Sequence[np.ndarray]) -> bytes:
    """The record of one sequence's state `tensors` at `version`, stamped with `tag` (the
    format is in the module docstring; values are written little-endian)."""
    parts = [_HEADER.pack(MAGIC, FORMAT, len(tensors), 0, version, tag)]
    for tensor in tensors:
        array = np.ascontiguousarray(tensor, dtype=tensor.dtype.newbyteorder("<"))
        dtype = array.dtype.str.encode()
        parts.append(
            struct.pack(
                f"<B{len(dtype)}sB{array.ndim}I", len(dtype), dtype, array.ndim, *array.shape
            )
        )
        parts.append(array.tobytes())
    return b"".join(parts)


def decode_state(data: bytes) -> StoredState:
    """The record's contents; ValueError when the bytes are not an rnnserve state record."""
    if len(data) < _HEADER.size:
        raise ValueError(f"{len(data)} bytes are too short for a state record")
    magic, fmt, count, _, version, tag = _HEADER.unpack_from(data)
    if magic != MAGIC or fmt != FORMAT:
        raise ValueError(f"not a state record of format {FORMAT} (starts {data[:5]!r})")
    offset = _HEADER.size
    tensors = []
    try:
        for _ in range(count):
            (size,) = struct.unpack_from("<B", data, offset)
            dtype = np.dtype(data[offset + 1 : offset + 1 + size].decode())
            offset += 1 + size
            (rank,) = struct.unpack_from("<B", data, offset)
            shape = struct.unpack_from(f"<{rank}I", data, offset + 1)
            offset += 1 + 4 * rank
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if offset + nbytes > len(data):
                raise ValueError("record is truncated")
            tensors.append(np.frombuffer(data, dtype, int(np.prod(shape)), offset).reshape(shape))
            offset += nbytes
    except (struct.error, TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"malformed state record: {error}") from error
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} trailing bytes after the last tensor")
    return StoredState(version, tag, tuple(tensors))


@dataclass(frozen=True, slots=True)
class StateKey:
    """Which record holds a sequence's state: model, version, owner and sequence id."""

    model: str
    version: int
    sequence_id: SequenceId
    owner: str = ""
    """The principal the sequence belongs to; empty without authentication."""

    def __str__(self) -> str:
        # Integer and string ids are different sequences (as in Triton), hence the i/s prefix.
        # The owner is percent-encoded: a principal with a colon (a SPIFFE id, say) could
        # otherwise shift the fields and name another principal's record. "-" is no owner.
        kind = "s" if isinstance(self.sequence_id, str) else "i"
        owner = "-" if not self.owner else "%2D" if self.owner == "-" else quote(self.owner, "")
        return f"rnnserve:{self.model}:{self.version}:{owner}:{kind}{self.sequence_id}"


@dataclass(frozen=True, slots=True)
class Read:
    """One record to read, by its key (a StateKey as a string)."""

    key: str
    unless: bytes = b""
    """A stamp: answer UNCHANGED rather than the record while the record still has it."""


@dataclass(frozen=True, slots=True)
class Write:
    """One record to write or delete, by its key (a StateKey as a string)."""

    key: str
    record: bytes | None
    """The new record (or tombstone), or None to delete it (unconditionally only)."""
    expect: bytes | None = None
    """The stamp the record must have for the write to apply; None writes unconditionally.
    A record that already carries the new record's stamp counts as applied: it is this very
    write, sent again after its reply was lost."""
    ttl_s: float = 0.0
    """Seconds the record lives without another write (the model's idle timeout)."""


ReadResult = bytes | None | Exception
"""A record, UNCHANGED, None (no record), or this operation's own error."""
WriteResult = bool | Exception
"""True when applied, False when the record's stamp was not the expected one."""


ROUND_TRIP_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
"""Upper bounds, in seconds, of the store round-trip histogram's buckets (a loopback Redis
answers in about 0.1 ms; the store timeout defaults to 2 s)."""


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """What a shared store has seen since the server started, for the metrics."""

    round_trips: tuple[int, ...]
    """Round trips by duration: one count per bucket of ROUND_TRIP_BUCKETS (a duration lands
    in the first bucket whose bound it does not exceed), then one for longer ones."""
    round_trip_s: float
    """The seconds all round trips took together."""
    failovers: int
    """Times the primary moved to another server (Sentinel)."""
    replication_failures: int
    """Round trips whose writes did not reach --state-min-replicas replicas in time."""


class StateStore(Protocol):
    """Where states go beyond the arena. Methods are synchronous and thread-safe: the batch
    workers call them, never the event loop. Each call is one round trip; an error of the
    whole round trip raises StoreUnavailable.

    Every operation is safe to repeat: a read changes nothing, and a write sent twice leaves
    what it left once. A write whose reply was lost (a timeout, a connection that broke after
    sending) may or may not have been applied: its error is StoreOutcomeUnknown, never "not
    applied"; the next read settles it from the stored stamp."""

    name: str
    """For messages and logs, without credentials."""
    shared: bool
    """Whether other processes see what is written (False: nothing is ever read back)."""

    def read(self, reads: Sequence[Read]) -> list[ReadResult]:
        """One round trip: a result per read, in order."""
        ...

    def write(self, writes: Sequence[Write]) -> list[WriteResult]:
        """One round trip: a result per write, in order (StoreOutcomeUnknown where the reply
        was lost)."""
        ...

    def ping(self) -> None:
        """Return once the store answers; StoreUnavailable when it does not."""
        ...

    def statistics(self) -> StoreStatistics | None:
        """Counts so far, safe from any thread; None for a store that has none."""
        ...

    def close(self) -> None:
        """Release its connections; nothing is read or written after this."""
        ...


class MemoryStore:
    """No store at all: states live in the arena of the replica that holds the sequence."""

    name = "memory"
    shared = False

    def read(self, reads: Sequence[Read]) -> list[ReadResult]:
        """No record, for every read."""
        return [None for _ in reads]

    def write(self, writes: Sequence[Write]) -> list[WriteResult]:
        """Every write applied (and forgotten)."""
        return [True for _ in writes]

    def ping(self) -> None:
        """Always answers."""
        pass

    def statistics(self) -> None:
        """No traffic to count."""
        return None

    def close(self) -> None:
        """Nothing to release."""
        pass
