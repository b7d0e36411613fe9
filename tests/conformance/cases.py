"""The protocol cases: each a list of calls, with what the model computes where it answers.

A case gets fresh sequence ids from `Ids` (the same ones on both servers, other ones for each
transport) and its data from a generator seeded by its name, so both servers see the same
requests. Expected outputs come from the model run in-process over each whole sequence.

Not a case: a request of zero time steps. rnnserve refuses it (INVALID_ARGUMENT); it aborts
Triton 2.51 (ONNX Runtime throws inside its backend, SIGABRT), and with it every later case.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tests.api.conftest import INPUTS, MODELS, OUTPUTS, Reference
from tests.conformance.protocol import Call, Tensor


class Ids:
    """Sequence ids no other case (or transport) of this session uses, integer or string."""

    def __init__(self, base: int, label: str) -> None:
        self._base, self._label, self._count = base, label, 0

    def integer(self) -> int:
        self._count += 1
        return self._base + self._count

    def string(self) -> str:
        self._count += 1
        return f"{self._label}/{self._count}-é"  # not ASCII: ids travel as UTF-8


def data(model: str, steps: int, rng: np.random.Generator, batch: int = 1) -> np.ndarray:
    """Realistic input: character ids 0..96, temperatures, pixel rows of 0..16."""
    if model == "charlm_lstm":
        return rng.integers(0, 97, size=(batch, steps), dtype=np.int64)
    if model == "sensor_gru":
        return (24 + 2 * rng.standard_normal((batch, steps, 1))).astype(np.float32)
    return rng.integers(0, 17, size=(batch, steps, 8)).astype(np.float32)


def sequence(
    reference: Reference,
    model: str,
    x: np.ndarray,
    sequence_id: int | str,
    sizes: Sequence[int],
    start: bool = True,
    end: bool = True,
    before: np.ndarray | None = None,
) -> list[Call]:
    """`x` cut into requests of `sizes` steps; `before`: what the sequence already ran."""
    whole = x if before is None else np.concatenate([before, x], axis=1)
    expected = reference.run(model, whole)[:, whole.shape[1] - x.shape[1] :]
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == x.shape[1]
    return [
        Call(
            model,
            (Tensor(INPUTS[model], x[:, first:last]),),
            sequence_id,
            start=start and index == 0,
            end=end and index == len(sizes) - 1,
            expect={OUTPUTS[model]: expected[:, first:last]},
        )
        for index, (first, last) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def refused(
    model: str,
    *inputs: Tensor,
    sequence_id: int | str,
    start: bool = False,
    outputs: tuple[str, ...] = (),
    on_the_wire: bool = False,
) -> Call:
    return Call(
        model, inputs, sequence_id, start, outputs=outputs, refused=True, on_the_wire=on_the_wire
    )


Build = Callable[[Ids, Reference, np.random.Generator], list[Call]]


@dataclass(frozen=True)
class Case:
    name: str
    build: Build
    pipelined: bool = False
    """On a stream, send every call before reading any answer (each call must be answered)."""

    def calls(self, ids: Ids, reference: Reference) -> list[Call]:
        return self.build(ids, reference, np.random.default_rng(zlib.crc32(self.name.encode())))


def golden(steps_per_request: str, id_kind: str) -> Build:
    """Two sequences of each model, interleaved at random, every one ended; T1: one time step
    per request, Tn: 2..4."""

    def build(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
        pending = []
        for model in MODELS:
            for _ in range(2):
                sizes = [1] * 6 if steps_per_request == "T1" else list(rng.integers(2, 5, 3))
                x = data(model, sum(sizes), rng)
                sid = ids.integer() if id_kind == "int" else ids.string()
                pending.append(sequence(reference, model, x, sid, sizes))
        order = []
        while pending:
            chosen = pending[int(rng.integers(len(pending)))]
            order.append(chosen.pop(0))
            pending = [calls for calls in pending if calls]
        return order

    return build


def start_on_a_live_id(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    sid = ids.integer()
    first, again = data("charlm_lstm", 3, rng), data("charlm_lstm", 2, rng)
    return [
        *sequence(reference, "charlm_lstm", first, sid, [3], end=False),
        *sequence(reference, "charlm_lstm", again, sid, [2]),  # from the zero state
    ]


def length_1_sequences(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    """START and END in one request: one step of each model, then four steps."""
    calls = [sequence(reference, m, data(m, 1, rng), ids.integer(), [1])[0] for m in MODELS]
    x = data("charlm_lstm", 4, rng)
    return [*calls, *sequence(reference, "charlm_lstm", x, ids.string(), [4])]


def end_then_continue(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    sid, x = ids.integer(), data("sensor_gru", 3, rng)
    return [
        *sequence(reference, "sensor_gru", x, sid, [2, 1]),
        refused("sensor_gru", Tensor("reading", data("sensor_gru", 1, rng)), sequence_id=sid),
    ]


def end_then_start_again(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    sid = ids.integer()
    first, again = data("digits_lstm", 4, rng), data("digits_lstm", 3, rng)
    return [
        *sequence(reference, "digits_lstm", first, sid, [4]),
        *sequence(reference, "digits_lstm", again, sid, [1, 2]),
    ]


def missing_start(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    x = Tensor("reading", data("sensor_gru", 1, rng))
    return [refused("sensor_gru", x, sequence_id=ids.integer())]


def missing_start_string_id(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    x = Tensor("tokens", data("charlm_lstm", 2, rng))
    return [refused("charlm_lstm", x, sequence_id=ids.string())]


def string_and_integer_ids_differ(
    ids: Ids, reference: Reference, rng: np.random.Generator
) -> list[Call]:
    """Integer 5 and string "5" are two sequences: the string one was never started."""
    sid, x = ids.integer(), data("digits_lstm", 3, rng)
    first, rest = sequence(reference, "digits_lstm", x[:, :2], sid, [2], end=False), x[:, 2:]
    return [
        *first,
        refused("digits_lstm", Tensor("pixels", rest), sequence_id=str(sid)),
        *sequence(reference, "digits_lstm", rest, sid, [1], start=False, before=x[:, :2]),
    ]


def id_zero(wire: bool, sequence_id: int | str) -> Build:
    """tritonclient sends no sequence parameters for id 0 or "": a request outside any
    sequence, to a model that has state. On the wire, the id and START are written out."""

    def build(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
        x = Tensor("reading", data("sensor_gru", 1, rng))
        return [
            refused("sensor_gru", x, sequence_id=sequence_id, start=True, on_the_wire=wire),
        ]

    return build


def batch_2_at_start(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    x = Tensor("reading", data("sensor_gru", 2, rng, batch=2))
    return [refused("sensor_gru", x, sequence_id=ids.integer(), start=True)]


def batch_2_inside_a_sequence(
    ids: Ids, reference: Reference, rng: np.random.Generator
) -> list[Call]:
    """Refused, and the sequence goes on as if it had never been sent."""
    sid, x = ids.integer(), data("sensor_gru", 3, rng)
    return [
        *sequence(reference, "sensor_gru", x[:, :2], sid, [2], end=False),
        refused("sensor_gru", Tensor("reading", data("sensor_gru", 1, rng, 2)), sequence_id=sid),
        *sequence(reference, "sensor_gru", x[:, 2:], sid, [1], start=False, before=x[:, :2]),
    ]


def unknown_model(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    x = Tensor("reading", data("sensor_gru", 1, rng))
    return [refused("gpt", x, sequence_id=ids.integer(), start=True)]


def unknown_input(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    x = Tensor("temperature", data("sensor_gru", 1, rng))
    return [refused("sensor_gru", x, sequence_id=ids.integer(), start=True)]


def unknown_output(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    x = Tensor("reading", data("sensor_gru", 1, rng))
    return [refused("sensor_gru", x, sequence_id=ids.integer(), start=True, outputs=("nope",))]


def state_output(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    """A sequence's request asks for its state output as well."""
    x, outputs = data("sensor_gru", 3, rng), ("forecast", "h_out")
    return [
        Call(
            "sensor_gru",
            (Tensor("reading", x),),
            ids.integer(),
            start=True,
            end=True,
            outputs=outputs,
            refused=True,
            expect=reference.outputs("sensor_gru", x, outputs),
        )
    ]


def explicit_state(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    """No sequence id: the client sends the state in and asks for it out."""
    x, h = data("sensor_gru", 2, rng), rng.standard_normal((1, 2, 64)).astype(np.float32) / 4
    outputs = ("forecast", "h_out")
    return [
        Call(
            "sensor_gru",
            (Tensor("reading", x), Tensor("h_in", h)),
            outputs=outputs,
            refused=True,
            expect=reference.outputs("sensor_gru", x, outputs, state={"h_in": h}),
        )
    ]


def wrong_dtype(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    x = Tensor("tokens", data("charlm_lstm", 3, rng).astype(np.float32))
    return [refused("charlm_lstm", x, sequence_id=ids.integer(), start=True)]


def wrong_shape(ids: Ids, reference: Reference, rng: np.random.Generator) -> list[Call]:
    x = Tensor("pixels", data("digits_lstm", 2, rng)[:, :, :7].copy())
    return [refused("digits_lstm", x, sequence_id=ids.integer(), start=True)]


CASES = {
    case.name: case
    for case in (
        *(
            Case(f"golden-{steps}-{kind}-ids", golden(steps, kind), pipelined=True)
            for steps in ("T1", "Tn")
            for kind in ("int", "string")
        ),
        Case("start-on-a-live-id", start_on_a_live_id),
        Case("length-1-sequences", length_1_sequences),
        Case("end-then-continue", end_then_continue),
        Case("end-then-start-again", end_then_start_again),
        Case("missing-start", missing_start),
        Case("missing-start-string-id", missing_start_string_id),
        Case("string-and-integer-ids-differ", string_and_integer_ids_differ),
        Case("id-0", id_zero(wire=False, sequence_id=0)),
        Case("id-empty-string", id_zero(wire=False, sequence_id="")),
        Case("id-0-on-the-wire", id_zero(wire=True, sequence_id=0)),
        Case("id-empty-string-on-the-wire", id_zero(wire=True, sequence_id="")),
        Case("batch-2-at-start", batch_2_at_start),
        Case("batch-2-inside-a-sequence", batch_2_inside_a_sequence),
        Case("unknown-model", unknown_model),
        Case("unknown-input", unknown_input),
        Case("unknown-output", unknown_output),
        Case("state-output", state_output),
        Case("explicit-state", explicit_state),
        Case("wrong-dtype", wrong_dtype),
        Case("wrong-shape", wrong_shape),
    )
}
